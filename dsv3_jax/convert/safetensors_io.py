"""Safetensors files read and written one tensor at a time (no whole-file loads).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, offsets relative
to the end of the header) and the raw little-endian tensor bytes. Reading parses the header and
reads one tensor's bytes at its offset; writing plans every tensor of a shard up front (names,
dtypes and shapes are known from the config), writes the header, and then writes each tensor at
its offset whenever it is ready, in any order. bfloat16 and float8 come from ml_dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

# safetensors dtype name -> numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: `file`, absolute byte range [start, end), dtype name, shape."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorEntry]:
    """{name: TensorEntry} of one safetensors file, from its header alone.

    Raises ValueError naming the file for a truncated file, a malformed header, or a tensor whose
    byte range does not match its shape and dtype or lies past the end of the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: header length {n} exceeds the file ({size} bytes); the "
                             "file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: malformed safetensors header: {e}") from e
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        entry = TensorEntry(name, path, info["dtype"], shape, base + begin, base + end)
        itemsize = _itemsize(info["dtype"])
        if itemsize is not None and entry.nbytes != math.prod(shape) * itemsize:
            raise ValueError(f"{path}: tensor {name} has {entry.nbytes} bytes; shape {shape} in "
                             f"{info['dtype']} needs {math.prod(shape) * itemsize}")
        if entry.end > size:
            raise ValueError(f"{path}: tensor {name} ends at byte {entry.end}, past the end of "
                             f"the file ({size} bytes); the file is truncated")
        out[name] = entry
    return out


def _itemsize(dtype: str) -> int | None:
    if dtype in DTYPES:
        return DTYPES[dtype].itemsize
    return {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E5M2": 1}.get(dtype)


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """The tensor's values (a fresh array of its stored dtype; only its own bytes are read)."""
    if entry.dtype not in DTYPES:
        raise ValueError(f"tensor {entry.name} in {entry.file} has dtype {entry.dtype}; "
                         f"supported: {sorted(DTYPES)}")
    dtype = DTYPES[entry.dtype]
    count = math.prod(entry.shape)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        data = np.fromfile(f, dtype=dtype, count=count)
    if data.size != count:
        raise ValueError(f"tensor {entry.name}: {entry.file} ended after {data.size} of {count} "
                         "values")
    return data.reshape(entry.shape)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class ShardedWriter:
    """Writes `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` in `directory`.

    The tensors (in file order) are split into shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own); every file is created at its full size with its header, and
    `write(name, array)` puts one tensor at its offset. `close()` checks that every tensor was
    written and writes the index. Memory: nothing is buffered beyond the array passed in.
    """

    def __init__(self, directory: str, tensors: Iterable[PlannedTensor], max_shard_bytes: int):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in tensors:
            if t.dtype not in DTYPES:
                raise ValueError(f"tensor {t.name}: dtype {t.dtype} is not one of {sorted(DTYPES)}")
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.directory = directory
        self.total_bytes = 0
        self._where: dict[str, tuple[int, int, PlannedTensor]] = {}  # name -> (shard, offset, t)
        self._files: list[str] = []
        self._fds: list[int] = []
        self._written: set[str] = set()
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for t in shard:
                if t.name in self._where or t.name in header:
                    raise ValueError(f"tensor {t.name} is planned twice")
                header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                                  "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes
            fd = os.open(os.path.join(directory, fname), os.O_RDWR | os.O_CREAT | os.O_TRUNC,
                         0o644)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            base = 8 + len(raw)
            os.ftruncate(fd, base + offset)
            for t in shard:
                self._where[t.name] = (i, base + header[t.name]["data_offsets"][0], t)
            self._files.append(fname)
            self._fds.append(fd)
            self.total_bytes += offset

    @property
    def weight_map(self) -> dict[str, str]:
        return {name: self._files[i] for name, (i, _, _) in self._where.items()}

    def write(self, name: str, array: np.ndarray) -> None:
        """Write one planned tensor; its dtype and shape must be the planned ones."""
        shard, offset, t = self._where[name]
        fd = self._fds[shard]
        if array.dtype != DTYPES[t.dtype] or tuple(array.shape) != t.shape:
            raise ValueError(f"tensor {name}: planned {t.dtype} {t.shape}, got "
                             f"{array.dtype} {tuple(array.shape)}")
        view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        self._written.add(name)

    def close(self) -> None:
        """Check completeness, close the files and write `model.safetensors.index.json`."""
        for fd in self._fds:
            os.close(fd)
        self._fds = [-1] * len(self._fds)
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. "
                               f"{missing[:3]}")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)

    def abort(self) -> None:
        """Close the files without writing the index (after a failure)."""
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = [-1] * len(self._fds)
