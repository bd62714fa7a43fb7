"""SM clock, board power and power capping of GPU 0 while a measurement runs (NVML via ctypes).

A kernel that keeps the tensor cores busy can draw the board's whole power limit (700 W on an
H200 SXM), and the driver then lowers the SM clock below its 1980 MHz boost, so the same kernel
measures slower in one run than in another. Logging the clock beside each timing tells that
apart from a slower kernel:

  with ClockSampler() as clocks:
      t = time_it(...)
  print(clocks.summary())  # "sm 1452 MHz, 694 W, power-capped 93%"

Samples every `period_s` in a thread (NVML calls release the GIL while the timed calls block in
block_until_ready). Without NVML (no NVIDIA driver, a CPU run) `summary()` is "" and the fields
are None: never an error in a benchmark.
"""

from __future__ import annotations

import ctypes
import statistics
import threading

_NVML_CLOCK_SM = 1
# nvmlClocksEventReasons (formerly ClocksThrottleReasons): software power cap.
_SW_POWER_CAP = 0x4
_lib = None
_handle = None


def _nvml():
    """(library, device-0 handle), or (None, None) where NVML cannot be loaded."""
    global _lib, _handle
    if _lib is None:
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
            handle = ctypes.c_void_p()
            if lib.nvmlInit_v2() or lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)):
                raise OSError("nvmlInit or nvmlDeviceGetHandleByIndex failed")
            _lib, _handle = lib, handle
        except (OSError, AttributeError):
            _lib = False
    return (_lib, _handle) if _lib else (None, None)


def sample() -> tuple[int, float, bool] | None:
    """(SM MHz, board watts, power-capped now) of GPU 0, or None without NVML."""
    lib, handle = _nvml()
    if lib is None:
        return None
    mhz, milliwatts, reasons = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
    if (lib.nvmlDeviceGetClockInfo(handle, _NVML_CLOCK_SM, ctypes.byref(mhz))
            or lib.nvmlDeviceGetPowerUsage(handle, ctypes.byref(milliwatts))
            or lib.nvmlDeviceGetCurrentClocksThrottleReasons(handle, ctypes.byref(reasons))):
        return None
    return mhz.value, milliwatts.value / 1e3, bool(reasons.value & _SW_POWER_CAP)


class ClockSampler:
    """Context manager: samples GPU 0 while the body runs; see the module docstring."""

    def __init__(self, period_s: float = 0.002):
        self.period_s = period_s
        self.samples: list[tuple[int, float, bool]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ClockSampler:
        if sample() is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            s = sample()
            if s is not None:
                self.samples.append(s)

    @property
    def sm_mhz(self) -> float | None:
        return statistics.mean(s[0] for s in self.samples) if self.samples else None

    @property
    def watts(self) -> float | None:
        return statistics.mean(s[1] for s in self.samples) if self.samples else None

    @property
    def capped(self) -> float | None:
        """Fraction of samples with the software power cap active."""
        return statistics.mean(s[2] for s in self.samples) if self.samples else None

    def summary(self) -> str:
        if not self.samples:
            return ""
        return (f"sm {self.sm_mhz:.0f} MHz, {self.watts:.0f} W, "
                f"power-capped {self.capped:.0%}")
