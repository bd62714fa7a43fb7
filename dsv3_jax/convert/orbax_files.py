"""Orbax checkpoints read and written slice by slice through tensorstore.

Our variables stack layers and experts (params/moe_layers/moe/w_gate is [58, 256, 7168, 2048] for
671B), so a converter must never hold a whole stacked leaf. Orbax itself only saves and restores
whole arrays, but it stores them through tensorstore, so both directions go underneath it, in the
layout orbax-checkpoint 0.12.4 writes and reads (checked against a real orbax save by the tests):

  STEP/_CHECKPOINT_METADATA      the item handlers (state: PyTree, meta: JSON)
  STEP/meta/metadata             JSON: {"model": ModelConfig fields, "tokenizer": ..., ...}
  STEP/state/_METADATA           the pytree: one entry per leaf, keyed "('params', 'embed')",
                                 saved as numpy arrays (no device or sharding recorded), with
                                 use_ocdbt=true, use_zarr3=false and
                                 store_array_data_equal_to_fill_value=true
  STEP/state/manifest.ocdbt, d/  one OCDBT key-value database holding a zarr v2 array per leaf
                                 under the key "params.embed" (zstd-compressed chunks)

Writing pre-creates every zarr array with a chunk per released tensor (one layer's or one
expert's slice), then fills the chunks one tensor at a time; OCDBT commits are batched into
transactions of about `commit_bytes`, which tensorstore holds until the commit (decoded, encoded
and in its data file buffer: about 4-5x `commit_bytes` measured), besides the tensor at hand.
Reading opens the same arrays (also those the trainer wrote, whatever their chunking) and reads
index ranges of them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from dsv3_jax.checkpoints import META, STATE

Path = tuple[str, ...]
_MAX_CHUNK_BYTES = 2**30  # orbax caps chunks near its 2 GiB OCDBT target data file size
_ORBAX_HANDLERS = {
    META: "orbax.checkpoint._src.handlers.json_checkpoint_handler.JsonCheckpointHandler",
    STATE: "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
}


def _context() -> ts.Context:
    # No cache of decoded chunks (each is read once); a bounded cache of OCDBT B-tree nodes so
    # that every read does not re-fetch the root node.
    return ts.Context({"cache_pool": {"total_bytes_limit": 0},
                       "cache_pool#ocdbt": {"total_bytes_limit": 0},
                       "file_io_concurrency": {"limit": 16}})


def _kvstore(state_dir: str, name: str, use_ocdbt: bool, write: bool = False) -> dict[str, Any]:
    if not use_ocdbt:
        return {"driver": "file", "path": os.path.join(state_dir, name)}
    spec: dict[str, Any] = {"driver": "ocdbt",
                            "base": {"driver": "file", "path": state_dir.rstrip("/") + "/"},
                            "path": name, "cache_pool": "cache_pool#ocdbt"}
    if write:  # orbax's own write options (tensorstore_utils.add_ocdbt_write_options)
        spec["config"] = {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100000000,
                          "manifest_kind": "single"}
        spec["target_data_file_size"] = 2**31
    return spec


def param_name(path: Path) -> str:
    """Orbax's name of a leaf: its dict keys joined by '.' (the zarr array's key)."""
    return ".".join(path)


class OrbaxReader:
    """Arrays of one step's `state` item, opened lazily; reads index ranges of them."""

    def __init__(self, step_dir: str):
        self.state_dir = os.path.join(step_dir, STATE)
        path = os.path.join(self.state_dir, "_METADATA")
        if not os.path.isfile(path):
            raise ValueError(f"{self.state_dir!r} has no _METADATA: not an orbax PyTree item")
        with open(path) as f:
            metadata = json.load(f)
        self.use_ocdbt = bool(metadata.get("use_ocdbt", True))
        self.driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
        self.names = {param_name(tuple(str(k["key"]) for k in v["key_metadata"]))
                      for v in metadata["tree_metadata"].values()}
        self._context = _context()
        self._open: dict[str, ts.TensorStore] = {}

    def array(self, path: Path) -> ts.TensorStore:
        """The stored array of leaf `path` (ValueError naming it when the checkpoint lacks it)."""
        name = param_name(path)
        if name not in self._open:
            if name not in self.names:
                raise ValueError(f"checkpoint {self.state_dir!r} has no array {name!r}")
            self._open[name] = ts.open({
                "driver": self.driver,
                "kvstore": _kvstore(self.state_dir, name, self.use_ocdbt),
                "recheck_cached_data": False, "recheck_cached_metadata": False,
                "fill_missing_data_reads": False,  # a missing chunk is an error, not zeros
            }, context=self._context, open=True).result()
        return self._open[name]

    @staticmethod
    def chunk_shape(array: ts.TensorStore) -> tuple[int, ...]:
        return tuple(array.chunk_layout.read_chunk.shape)

    def read(self, path: Path, index: Sequence[int | slice] = ()) -> np.ndarray:
        """array[index] as numpy (its stored dtype)."""
        return np.asarray(self.array(path)[tuple(index)].read().result())


def chunk_shape_for(shape: Sequence[int], n_index: int, itemsize: int,
                    max_bytes: int = _MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """One chunk per released tensor: 1 along the `n_index` stacked dims (layer, expert), the
    full slice along the rest, halved along its leading dims while above `max_bytes`."""
    chunk = [1] * n_index + list(shape[n_index:])
    for d in range(n_index, len(chunk)):
        while math.prod(chunk) * itemsize > max_bytes and chunk[d] > 1:
            chunk[d] = -(-chunk[d] // 2)
    return tuple(max(1, c) for c in chunk)


class OrbaxWriter:
    """Writes the `state` and `meta` items of one step directory, a slice at a time.

    leaves: {path: (shape, dtype, n_index)}, every leaf of the state pytree with its stored dtype
    and how many leading (stacked) dims a released tensor indexes. `write` must cover each leaf
    completely (checked in `finish`, which also writes the metadata orbax reads).
    """

    def __init__(self, step_dir: str, leaves: dict[Path, tuple[tuple[int, ...], np.dtype, int]],
                 commit_bytes: int):
        self.step_dir = step_dir
        self.state_dir = os.path.join(step_dir, STATE)
        os.makedirs(self.state_dir)
        self.leaves = leaves
        self.commit_bytes = commit_bytes
        self._context = _context()
        self._arrays: dict[Path, ts.TensorStore] = {}
        self._written: dict[Path, set[tuple[int, ...]]] = {}
        self._txn = ts.Transaction()
        self._pending = 0
        for path, (shape, dtype, n_index) in leaves.items():
            dtype = np.dtype(dtype)
            chunk = chunk_shape_for(shape, n_index, dtype.itemsize)
            self._written[path] = set()
            self._arrays[path] = ts.open({
                "driver": "zarr",
                "kvstore": _kvstore(self.state_dir, param_name(path), True, write=True),
                "metadata": {"shape": list(shape), "chunks": list(chunk),
                             "compressor": {"id": "zstd", "level": 1},
                             "dtype": _zarr_dtype(dtype), "fill_value": None, "order": "C",
                             "dimension_separator": "."},
                "store_data_equal_to_fill_value": True,
                "recheck_cached_data": False, "recheck_cached_metadata": False,
            }, context=self._context, create=True).result()

    def write(self, path: Path, index: tuple[int, ...], value: np.ndarray) -> None:
        """Store `value` (cast to the leaf's dtype) at leaf[index]; commits every commit_bytes."""
        array = self._arrays[path]
        value = np.asarray(value, array.dtype.numpy_dtype)
        if len(index) != self.leaves[path][2]:
            raise ValueError(f"{param_name(path)}: index {index} must have "
                             f"{self.leaves[path][2]} entries")
        want = tuple(array.shape[len(index):])
        if value.shape != want:
            raise ValueError(f"{param_name(path)}{list(index)}: expected shape {want}, found "
                             f"{value.shape}")
        array.with_transaction(self._txn)[index].write(value).result()
        self._written[path].add(tuple(index))
        self._pending += value.nbytes
        if self._pending >= self.commit_bytes:
            self.commit()

    def commit(self) -> None:
        self._txn.commit_sync()
        self._txn = ts.Transaction()
        self._pending = 0

    def finish(self, meta: dict[str, Any]) -> None:
        """Commit the last writes, check every leaf is complete, and write orbax's metadata."""
        self.commit()
        for path, (shape, _, n_index) in self.leaves.items():
            if len(self._written[path]) != math.prod(shape[:n_index]):
                raise RuntimeError(f"leaf {param_name(path)}: {len(self._written[path])} of "
                                   f"{math.prod(shape[:n_index])} slices written")
        # What orbax writes for a tree of numpy arrays: no sharding or device is recorded, so
        # any topology restores it (as numpy, or as jax.Arrays given shardings).
        tree = {str(path): {
            "key_metadata": [{"key": k, "key_type": 2} for k in path],  # 2: a dict key
            "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False}}
            for path in sorted(self.leaves)}
        _write_json(os.path.join(self.state_dir, "_METADATA"), {
            "tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
            "store_array_data_equal_to_fill_value": True, "custom_metadata": None})
        os.makedirs(os.path.join(self.step_dir, META))
        _write_json(os.path.join(self.step_dir, META, "metadata"), meta)
        now = time.time_ns()
        _write_json(os.path.join(self.step_dir, "_CHECKPOINT_METADATA"), {
            "item_handlers": _ORBAX_HANDLERS, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now, "custom_metadata": {}})


def _zarr_dtype(dtype: np.dtype) -> str:
    return {"float32": "<f4", "bfloat16": "bfloat16", "float16": "<f2"}[np.dtype(dtype).name]


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
