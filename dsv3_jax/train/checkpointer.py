"""Orbax checkpoints of a training run: asynchronous saves, keep-last-K, verified restores.

A step directory holds three items: `state` (the train state pytree), `data` (the data
iterator's state, JSON) and `meta` (JSON: the model config, the run config, the tokenizer, and a
fingerprint of the state). Orbax writes into a temporary directory and renames it when complete,
so a half-written save is never listed. A listed checkpoint that fails to restore, or whose
restored values do not match the fingerprint saved beside them, is moved aside (renamed, never
deleted) and the previous one is used. A save that runs out of disk raises one
`CheckpointWriteError` naming the directory, the free space and the space needed; the earlier
checkpoints are left as they were.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Out of disk, out of quota, or over the file-size limit: a save cannot complete here.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the disk is full); earlier checkpoints are intact."""


def no_space(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) is running out of space. Orbax's TensorStore writes
    report the OS error only in the message ("... [os_error_code='28']")."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        codes = re.findall(r"os_error_code='(\d+)'", str(error))
        if any(int(c) in _NO_SPACE for c in codes):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DropNoSpaceTracebacks(logging.Filter):
    """Orbax logs each failed write thread with its traceback; a full disk is reported once, by
    CheckpointWriteError, so those records are dropped (any other error still logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (no_space(error) or no_space(RuntimeError(record.getMessage())))


logging.getLogger("absl").addFilter(_DropNoSpaceTracebacks())


def _quiet_closed_loop_callbacks(previous):
    """A restore that fails (a corrupt checkpoint, set aside) closes orbax's asyncio loop while
    TensorStore reads of its other arrays are still in flight; each one then completes into a
    closed loop and reports "RuntimeError: Event loop is closed" as an unraisable exception, a
    traceback that means nothing here. Only that one is dropped; everything else reaches the
    previous hook."""

    def hook(unraisable):
        error, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
        if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                and "call_soon_threadsafe" in frames):
            return
        previous(unraisable)

    return hook


sys.unraisablehook = _quiet_closed_loop_callbacks(sys.unraisablehook)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def fingerprint(tree: Any) -> list[float]:
    """Sum of each leaf (as float32): a cheap check that restored values are the saved ones."""
    return [float(jnp.sum(jnp.asarray(x).astype(jnp.float32))) for x in jax.tree.leaves(tree)]


def fingerprints_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    # Sums may be reduced in another order on another device layout: relative 1e-5.
    return all(np.isclose(x, y, rtol=1e-5, atol=1e-6) or (np.isnan(x) and np.isnan(y))
               for x, y in zip(a, b, strict=True))


def restore_args_for(abstract: Any) -> Any:
    """Restore arguments placing every array with the sharding of its abstract leaf."""
    return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run in `directory` (WORKDIR/checkpoints)."""

    def __init__(self, directory: str, keep: int, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.asynchronous = asynchronous
        self.set_aside: list[str] = []  # checkpoints this run found unusable, where they went
        self._saving: tuple[int, int] | None = None  # (step, bytes) of the save in flight
        self._failed = False
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=self.asynchronous)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def unusable_on_disk(self) -> list[str]:
        """Checkpoints an earlier run set aside (`<step>.corrupt-<time>`)."""
        return sorted(os.path.join(self.directory, d) for d in os.listdir(self.directory)
                      if re.fullmatch(r"\d+\.corrupt-.*", d))

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the device)."""
        meta = dict(meta, step=int(step), fingerprint=fingerprint(state))
        with self._reporting_no_space():  # the previous save's error surfaces here too
            self.manager.wait_until_finished()
            self._saving = (int(step), sum(x.nbytes for x in jax.tree.leaves(state)))
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        with self._reporting_no_space():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with self._reporting_no_space():
                self.manager.close()

    @contextlib.contextmanager
    def _reporting_no_space(self):
        """Turns running out of space into one CheckpointWriteError (later ones are the same
        failure surfacing again, and pass silently)."""
        try:
            yield
        except Exception as e:
            if not no_space(e):
                raise
            if not self._failed:
                self._failed = True
                raise self._no_space_error() from None

    def _no_space_error(self) -> CheckpointWriteError:
        step, needed = self._saving or (-1, 0)
        free = shutil.disk_usage(self.directory).free
        kept = [s for s in self.steps() if s != step]
        return CheckpointWriteError(
            f"checkpoint {step} could not be written to {self.directory}: no space left "
            f"({_gib(free)} free there, a checkpoint of this run takes about {_gib(needed)}); "
            f"the earlier checkpoints are untouched ({', '.join(map(str, kept)) or 'none'}). "
            f"Free space (or give --workdir on a larger disk) and run the same command again "
            f"to resume")

    def restore_latest(self, abstract_state: Any):
        """(step, state, data_state, meta) of the newest checkpoint that restores and verifies,
        or None. Bad ones are renamed `<step>.corrupt-<time>` with a logged reason."""
        for step in reversed(self.steps()):
            error = None
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=abstract_state, restore_args=restore_args_for(abstract_state)),
                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
                state, meta = restored["state"], restored["meta"]
                if not fingerprints_match(fingerprint(state), meta.get("fingerprint", [])):
                    raise ValueError("restored values do not match the fingerprint saved with "
                                     "them")
            except Exception as e:
                error = e
            if _all_processes_agree(error is None):
                return step, state, restored["data"], meta
            self._set_aside(step, error or RuntimeError("another process could not restore it"))
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        src = os.path.join(self.directory, str(step))
        dst = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        log.error("checkpoint %s cannot be used (%s: %s); moved to %s, falling back to the "
                  "previous checkpoint", src, type(error).__name__, str(error)[:300], dst)
        if jax.process_index() == 0:
            os.rename(src, dst)
        self.set_aside.append(dst)
        if jax.process_count() > 1:  # every process re-lists the steps after the rename
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.manager.close()
        self._open()


def _all_processes_agree(ok: bool) -> bool:
    """True only when `ok` holds on every process (all then use, or all skip, a checkpoint)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
