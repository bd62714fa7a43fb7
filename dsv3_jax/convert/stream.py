"""Checkpoint conversion between our orbax checkpoints and Hugging Face safetensors directories.

  orbax_to_hf  a trainer workdir (its latest step) or one step directory -> config.json,
               model-0000i-of-0000n.safetensors + model.safetensors.index.json in the released
               layout (MTP as layer n_layers, e_score_correction_bias float32), tokenizer files
  hf_to_orbax  a Hugging Face / official DeepSeek-V3 directory (bf16, fp16, fp32, or FP8 E4M3
               with 128x128 `weight_scale_inv` block scales) -> one orbax step directory that
               dsv3_jax.checkpoints.load_variables (and so `launch.train --config.init_from`)
               restores, with the model config in its `meta` item; a directory without the
               MTP tensors its config asks for (what save_pretrained writes) imports with MTP
               depth 0, or with MTP modules initialized afresh (`mtp='init'`)

Both directions stream: one released tensor at a time, read and written as slices of our stacked
leaves (never a whole stacked leaf; see dsv3_jax/convert/orbax_files.py), so host memory stays
within a few times the largest released tensor plus a few output shards (`max_shard_bytes`: the
safetensors shard size, which is never buffered, or the bytes per OCDBT commit, which
tensorstore holds about 4-5 times over). Everything is checked before the first
byte is written where the headers and shapes allow it; output goes to `<out>.partial-XXXXXXXX`
and is renamed to `out` only when complete, and removed after a failure; what a killed
conversion left is removed by the next conversion to the same `out` (see _staging).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax import checkpoints
from dsv3_jax.config import ModelConfig
from dsv3_jax.convert.orbax_files import (
    OrbaxReader,
    OrbaxWriter,
    Path,
)
from dsv3_jax.convert.released import TensorSpec, tensor_map
from dsv3_jax.convert.safetensors_io import (
    DTYPES,
    PlannedTensor,
    ShardedWriter,
    TensorEntry,
    read_header,
    read_tensor,
)
from dsv3_jax.model import implementations
from dsv3_jax.model.api import abstract_variables
from dsv3_jax.model.moe import ROUTER_BIAS, ROUTER_STATS
from dsv3_jax.model.transformer import MTPModule

DTYPE_ALIASES = {"bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}
SCALE_SUFFIX = "_scale_inv"
DEFAULT_SHARD_BYTES = 5 * 10**9  # Hugging Face's "5GB"
# tensorstore holds a commit's chunks several times over (decoded, encoded, in the OCDBT data
# file buffer: about 4-5x measured), so orbax commits are smaller than safetensors shards.
DEFAULT_COMMIT_BYTES = 2**30
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '64MiB' or a number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r}: expected a number of bytes or e.g. 5GB, 500MB, 64MiB")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def _dtype_name(dtype: str) -> str:
    if dtype not in DTYPE_ALIASES:
        raise ValueError(f"--dtype={dtype!r} is not one of {sorted(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[dtype]


def _is_bias(spec: TensorSpec) -> bool:
    return spec.path[0] == ROUTER_BIAS


def leaf_shapes(cfg: ModelConfig) -> dict[Path, jax.ShapeDtypeStruct]:
    """{path: shape and dtype} of every variable (no allocation)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract_variables(cfg)))
    return {tuple(str(k.key) for k in keys): leaf for keys, leaf in flat}


def _slice_shape(leaf: jax.ShapeDtypeStruct, spec: TensorSpec) -> tuple[int, ...]:
    return tuple(leaf.shape[len(spec.index):])


def released_shape(cfg_leaves: dict[Path, jax.ShapeDtypeStruct],
                   spec: TensorSpec) -> tuple[int, ...]:
    """The [out, in] shape of the released tensor `spec` names."""
    return spec.expected_shape(_slice_shape(cfg_leaves[spec.path], spec))


def largest_tensor_bytes(cfg: ModelConfig) -> int:
    """Bytes of the largest released tensor in float32 (what the converter holds at a time)."""
    leaves = leaf_shapes(cfg)
    return max(math.prod(released_shape(leaves, s)) for s in tensor_map(cfg)) * 4


PARTIAL_LOCK = ".conversion.lock"  # in a partial directory: flock-held by its live converter


@contextlib.contextmanager
def _staging(out: str) -> Iterator[str]:
    """A fresh `<out>.partial-XXXXXXXX` directory, renamed to `out` on success, removed on error.

    Partial directories of `out` that killed conversions left are removed first (in one line):
    those whose PARTIAL_LOCK no process holds, the OS having released their converter's flock.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output {out!r} already exists and is not an empty directory; "
                         "choose a new path (conversions never overwrite)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _remove_stale_partials(out)
    tmp, lock = _new_partial(out)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if lock is not None:  # `out` gets no lock file; the flock is held past the rename, and
            os.unlink(os.path.join(tmp, PARTIAL_LOCK))  # a partial without one is never removed
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _new_partial(out: str) -> tuple[str, int | None]:
    """A fresh partial directory of `out` and the fd holding flock on its PARTIAL_LOCK, which is
    locked before it is renamed into place, so never seen free while this process lives (fd None
    and no PARTIAL_LOCK where the filesystem has no flock: the directory is then never removed).
    """
    parent, name = os.path.split(out)
    tmp = tempfile.mkdtemp(prefix=f"{name}.partial-", dir=parent)
    fd, path = tempfile.mkstemp(dir=tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        os.unlink(path)
        return tmp, None
    os.rename(path, os.path.join(tmp, PARTIAL_LOCK))
    return tmp, fd


def _remove_stale_partials(out: str) -> None:
    """Remove the partial directories of `out` whose PARTIAL_LOCK is free, saying so in one line.

    Only `<out>.partial-` + tempfile.mkdtemp's 8-character suffix: never `out` itself, another
    output's partials (`<out>2.partial-*`) or an output named like `<out>.partial-final`.
    """
    parent, name = os.path.split(out)
    ours = re.compile(re.escape(name) + r"\.partial-[a-z0-9_]{8}")
    removed = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if ours.fullmatch(entry) and not os.path.islink(path) and _remove_if_free(path):
            removed.append(path)
    if removed:
        _notice(f"removed {len(removed)} stale partial output(s) of an interrupted conversion: "
                f"{', '.join(removed)}")


def _remove_if_free(partial: str) -> bool:
    """Remove `partial` if its PARTIAL_LOCK is there and no process holds it; whether removed."""
    lock = os.path.join(partial, PARTIAL_LOCK)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # none: a live converter's, being set up or finishing, or not a partial
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(fd), os.stat(lock)):
            return False
        shutil.rmtree(partial, ignore_errors=True)
        return not os.path.exists(partial)
    except OSError:  # held by a live converter, or gone meanwhile
        return False
    finally:
        os.close(fd)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0)


# Orbax -> Hugging Face ---------------------------------------------------------------------------

def orbax_to_hf(checkpoint: str, out: str, dtype: str = "bf16",
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None,
                max_read_bytes: int | None = None, progress: bool = True) -> str:
    """Export a checkpoint (trainer workdir, its checkpoints dir, or one step dir) to `out`.

    dtype: 'bf16' or 'fp32' for every tensor but e_score_correction_bias (always float32).
    tokenizer: None exports the run's tokenizer (from the checkpoint's meta); a path to a
    tokenizer.json exports that one; 'none' exports none. max_read_bytes: the largest block of a
    stacked leaf read at once (default 2 x the largest released tensor in float32); a leaf whose
    stored chunks span more than that along the layer/expert dims is read slice by slice.
    Returns the absolute path of the written directory.
    """
    out_dtype = _dtype_name(dtype)
    step_dir = checkpoints.step_dir(checkpoint)
    meta = checkpoints.step_meta(step_dir)
    cfg = checkpoints.model_config(meta, os.path.join(step_dir, checkpoints.META))
    reader = OrbaxReader(step_dir)
    leaves = leaf_shapes(cfg)
    for path, leaf in leaves.items():
        stored = reader.array(path)
        if tuple(stored.shape) != tuple(leaf.shape):
            raise ValueError(f"checkpoint array {'.'.join(path)}: expected shape "
                             f"{tuple(leaf.shape)} for the model config in its meta, found "
                             f"{tuple(stored.shape)}")
        if stored.dtype.numpy_dtype.name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"checkpoint array {'.'.join(path)} has dtype "
                             f"{stored.dtype.numpy_dtype.name}; expected a float dtype")
    tok = _tokenizer_source(meta.get("tokenizer"), tokenizer, step_dir)
    specs = tensor_map(cfg)
    plan = [PlannedTensor(s.name, "F32" if _is_bias(s) else out_dtype, released_shape(leaves, s))
            for s in specs]
    stored_dtype = {p.name: DTYPES[p.dtype] for p in plan}
    read_limit = max_read_bytes or 2 * largest_tensor_bytes(cfg)
    hf_config = _hf_config_json(cfg, meta, tok, out_dtype)

    with _staging(out) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        try:
            with _progress(len(specs), "orbax -> HF", progress) as bar:
                for spec, value in _stream_orbax(reader, cfg, leaves, read_limit):
                    writer.write(spec.name, np.ascontiguousarray(
                        spec.to_torch_layout(value), dtype=stored_dtype[spec.name]))
                    bar.update()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        if tok is not None:
            _export_tokenizer(tok, tmp)
    return os.path.abspath(out)


@dataclasses.dataclass(frozen=True)
class _Tokenizer:
    path: str  # tokenizer.json
    bos_id: int | None
    eos_id: int | None


def _tokenizer_source(meta_tok: dict | None, override: str | None,
                      step_dir: str) -> _Tokenizer | None:
    """The tokenizer.json to export (checked now, before anything is written): `override` (a
    tokenizer.json or its directory; 'none': none), else the checkpoint's own, found as
    generation finds it (checkpoints.tokenizer_file; none for the byte-level one, which has no
    Hugging Face files)."""
    if override == "none":
        return None
    if override:
        path = os.path.join(override, "tokenizer.json") if os.path.isdir(override) else override
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer={override!r}: {path!r} does not exist; pass a "
                             "tokenizer.json (or its directory) or --tokenizer=none")
    else:
        path = checkpoints.tokenizer_file(meta_tok, os.path.join(step_dir, checkpoints.META))
        if path is None:
            return None
    from dsv3_jax.tokenizer import HFTokenizer

    t = HFTokenizer(path)
    return _Tokenizer(path, t.bos_id, t.eos_id)


def _hf_config_json(cfg: ModelConfig, meta: dict, tok: _Tokenizer | None,
                    out_dtype: str) -> dict[str, Any]:
    hf = cfg.to_hf()
    hf["dtype"] = "bfloat16" if out_dtype == "BF16" else "float32"
    source = meta.get("hf_config") or {}
    kind = (meta.get("tokenizer") or {}).get("kind")
    if "eos_token_id" in source:  # imported from Hugging Face: keep its special tokens
        hf["bos_token_id"], hf["eos_token_id"] = source.get("bos_token_id"), source["eos_token_id"]
    elif tok is not None:
        hf["bos_token_id"], hf["eos_token_id"] = tok.bos_id, tok.eos_id
    elif kind == "bytes":
        from dsv3_jax.tokenizer import ByteTokenizer

        hf["bos_token_id"], hf["eos_token_id"] = ByteTokenizer.bos_id, ByteTokenizer.eos_id
    return hf


def _export_tokenizer(tok: _Tokenizer, directory: str) -> None:
    """The tokenizer's files into an export (checkpoints.copy_tokenizer); beside a bare
    tokenizer.json, a tokenizer_config.json saying how transformers should load it."""
    if checkpoints.copy_tokenizer(tok.path, directory) != [checkpoints.TOKENIZER_FILES[0]]:
        return
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(tok.path).get_vocab(with_added_tokens=True)
    names = {i: n for n, i in vocab.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.bos_id is not None:
        config["bos_token"] = names[tok.bos_id]
    if tok.eos_id is not None:
        config["eos_token"] = names[tok.eos_id]
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _stream_orbax(reader: OrbaxReader, cfg: ModelConfig,
                  leaves: dict[Path, jax.ShapeDtypeStruct],
                  read_limit: int) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    """(spec, our float32 slice) for every released tensor, leaf by leaf, reading each leaf in
    blocks of whole stored chunks along its layer/expert dims (at most `read_limit` bytes) or,
    when its chunks are larger than that, one slice at a time."""
    by_leaf: dict[Path, dict[tuple[int, ...], list[TensorSpec]]] = {}
    for spec in tensor_map(cfg):
        by_leaf.setdefault(spec.path, {}).setdefault(spec.index, []).append(spec)
    for path, by_index in by_leaf.items():
        array = reader.array(path)
        n = len(next(iter(by_index)))
        shape = tuple(leaves[path].shape)
        chunk = reader.chunk_shape(array)
        block = chunk[:n]
        block_bytes = math.prod(block) * math.prod(shape[n:]) * array.dtype.numpy_dtype.itemsize
        if n == 0 or block_bytes > read_limit:
            block = (1,) * n
        for start in np.ndindex(*[-(-s // b) for s, b in zip(shape[:n], block, strict=True)]):
            lo = [i * b for i, b in zip(start, block, strict=True)]
            hi = [min(s, l + b) for s, l, b in zip(shape[:n], lo, block, strict=True)]
            values = reader.read(path, tuple(slice(l, h) for l, h in zip(lo, hi, strict=True)))
            for local in np.ndindex(*values.shape[:n]):
                index = tuple(int(l + i) for l, i in zip(lo, local, strict=True))
                for spec in by_index.get(index, ()):
                    yield spec, np.asarray(values[local], np.float32)
            del values


# Hugging Face -> orbax ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Source:
    spec: TensorSpec
    entry: TensorEntry
    scale: TensorEntry | None  # FP8 block scales


MTP_CHOICES = ("none", "init")


def hf_to_orbax(hf_dir: str, out: str, dtype: str = "fp32",
                max_shard_bytes: int = DEFAULT_COMMIT_BYTES, progress: bool = True,
                mtp: str = "none", seed: int = 0) -> str:
    """Import a Hugging Face / official DeepSeek-V3 directory into an orbax step directory `out`.

    dtype: the stored dtype of params, 'fp32' (our master weights) or 'bf16' (restored as
    float32); the router bias is always float32. max_shard_bytes: bytes per OCDBT commit.
    mtp: what to do when config.json asks for MTP but the files hold no MTP tensor (transformers'
    save_pretrained drops them): 'none' imports the main model with MTP depth 0, 'init' adds
    MTP modules initialized as training initializes them (`dsv3_jax.init` with
    jax.random.key(seed)); either is said in one line on stderr. Any other missing tensor is
    refused by name. Returns the absolute path of the written directory.
    """
    if mtp not in MTP_CHOICES:
        raise ValueError(f"--mtp={mtp!r} is not one of {', '.join(MTP_CHOICES)}")
    out_dtype = np.dtype(np.float32) if _dtype_name(dtype) == "F32" else np.dtype(
        ml_dtypes.bfloat16)
    hf_dir = os.path.abspath(hf_dir)
    hf_config = _read_hf_config(hf_dir)
    cfg = ModelConfig.from_hf(hf_config, source=os.path.join(hf_dir, "config.json"))
    quant = hf_config.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    entries = hf_entries(hf_dir)
    cfg, fresh_mtp, mtp_source = _mtp_to_import(cfg, entries, hf_dir, mtp, seed)
    specs = tensor_map(cfg)
    stored_specs = [s for s in specs if not (fresh_mtp and s.name.startswith(
        _mtp_prefixes(cfg)))]
    leaves = leaf_shapes(cfg)
    sources = _match_sources(cfg, stored_specs, leaves, entries, block)
    layout = _orbax_layout(specs, leaves, out_dtype)
    tokenizer_json = os.path.join(hf_dir, checkpoints.TOKENIZER_FILES[0])
    final = os.path.abspath(out)
    meta = {"model": dataclasses.asdict(cfg),
            "tokenizer": (checkpoints.own_tokenizer(final) if os.path.isfile(tokenizer_json)
                          else None),
            "hf_config": hf_config,
            "source": {"kind": "hf", "path": hf_dir, "dtype": np.dtype(out_dtype).name,
                       "mtp": mtp_source}}

    with _staging(out) as tmp:
        writer = OrbaxWriter(tmp, layout, max_shard_bytes)
        _write_released(writer, sources, leaves, block, progress)
        if fresh_mtp:
            for path, value in fresh_mtp_leaves(cfg, seed, max_shard_bytes):
                for index in np.ndindex(*value.shape[:layout[path][2]]):
                    writer.write(path, index, value[index])
        # beside the items, where checkpoints.tokenizer_file finds it
        checkpoints.copy_tokenizer(tokenizer_json, tmp)
        writer.finish(meta)
    return final


def _mtp_to_import(cfg: ModelConfig, entries: dict[str, TensorEntry], hf_dir: str, mtp: str,
                   seed: int) -> tuple[ModelConfig, bool, str]:
    """(the config to import, whether its MTP modules are initialized afresh, the meta's record
    of where MTP came from). A directory without the MTP tensors its config asks for imports
    with MTP depth 0 (mtp='none') or fresh MTP modules (mtp='init'), said in one line."""
    mtp_absent = cfg.mtp_depth > 0 and not any(
        n.startswith(_mtp_prefixes(cfg)) for n in entries)
    fresh_mtp = mtp_absent and mtp == "init"
    if mtp_absent:
        layers = ", ".join(f"model.layers.{p.split('.')[2]}.*" for p in _mtp_prefixes(cfg))
        done = (f"initialized {cfg.mtp_depth} MTP module(s) afresh as training does "
                f"(N(0, {cfg.init_std}^2) matrices, unit norms, zero bias; seed {seed})"
                if fresh_mtp else "imported the main model with MTP depth 0 (--mtp=init adds "
                "a freshly initialized MTP module instead)")
        _notice(f"{hf_dir} holds no MTP tensor ({layers}; transformers' save_pretrained drops "
                f"them) although config.json has num_nextn_predict_layers={cfg.mtp_depth}: "
                f"{done}")
        if not fresh_mtp:
            cfg = cfg.replace(mtp_depth=0)
    mtp_source = ("absent: depth 0" if mtp_absent and not fresh_mtp else
                  f"absent: initialized with seed {seed}" if fresh_mtp else
                  "imported" if cfg.mtp_depth else "none")
    return cfg, fresh_mtp, mtp_source


def _orbax_layout(specs: list[TensorSpec], leaves: dict[Path, jax.ShapeDtypeStruct],
                  out_dtype: np.dtype) -> dict[Path, tuple]:
    """{path: (shape, stored dtype, stacked dims)} of every leaf the released tensors fill (the
    router bias float32)."""
    layout = {}
    for spec in specs:
        if not spec.shared:
            leaf = leaves[spec.path]
            layout[spec.path] = (tuple(leaf.shape),
                                 np.float32 if _is_bias(spec) else out_dtype, len(spec.index))
    return layout


def _write_released(writer: OrbaxWriter, sources: list[_Source],
                    leaves: dict[Path, jax.ShapeDtypeStruct], block: tuple[int, int],
                    progress: bool) -> None:
    """Every released tensor into its slice of our leaves, in file order; a tensor the model
    shares (the MTP modules' embedding and head) is checked equal to its owner instead."""
    owners = {(s.spec.path, s.spec.index): s for s in sources if not s.spec.shared}
    with _progress(len(sources), "HF -> orbax", progress) as bar:
        for src in sorted(sources, key=lambda s: (s.entry.file, s.entry.start)):
            tensor = load_released(src.entry, src.scale, block)
            spec = src.spec
            if spec.shared:
                owner = owners[(spec.path, spec.index)]
                if not np.array_equal(tensor, load_released(owner.entry, owner.scale, block)):
                    raise ValueError(
                        f"tensor {spec.name} differs from {owner.spec.name}; this model "
                        "shares the embedding and output head between the main model and "
                        "MTP (paper 2.2), so they must be equal")
            else:
                shape = _slice_shape(leaves[spec.path], spec)
                writer.write(spec.path, spec.index, spec.from_torch_layout(tensor, shape))
            del tensor
            bar.update()


def _notice(message: str) -> None:
    """One line for the user on stderr (what a conversion did beyond the obvious)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


def _mtp_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """The released names' prefixes of the MTP depths (layers n_layers .. n_layers + D - 1)."""
    return tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.mtp_depth))


class _MTPModules(nn.Module):
    """The MTP modules alone, under the names `Transformer` gives them: flax derives a child's
    random numbers from the root key and the child's name only, so initializing this draws what
    `dsv3_jax.init` of the whole model draws for them, without making the rest."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_btd, positions_bt, valid_bt):
        for k in range(self.cfg.mtp_depth):
            h_btd, _, _ = MTPModule(self.cfg, name=f"mtp_{k}")(h_btd, h_btd, positions_bt, None,
                                                               valid_bt)
        return h_btd


def fresh_mtp_leaves(cfg: ModelConfig, seed: int,
                     max_bytes: int) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, value) of every MTP variable, equal to dsv3_jax.init(cfg, jax.random.key(seed))'s,
    made a group of leaves of at most `max_bytes` (or one larger leaf) at a time: each group is
    its own jitted program, from which XLA drops the other leaves' initializers."""
    model = implementations.resolved(cfg, jax.default_backend())  # as dsv3_jax.init traces it

    def init(rng):
        h_btd = jnp.zeros((1, 8, cfg.dim), jnp.float32)
        boxed = _MTPModules(model).init(rng, h_btd, jnp.zeros((1, 8), jnp.int32),
                                      jnp.ones((1, 8), bool))
        boxed.pop(ROUTER_STATS, None)
        flat, _ = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))
        return {tuple(str(k.key) for k in keys): leaf for keys, leaf in flat}

    rng = jax.random.key(seed)
    shapes = jax.eval_shape(init, rng)
    groups, size = [[]], 0
    for path, leaf in shapes.items():
        nbytes = math.prod(leaf.shape) * leaf.dtype.itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    for group in groups:
        values = jax.jit(lambda r, group=tuple(group): [init(r)[p] for p in group])(rng)
        for path, value in zip(group, values, strict=True):
            yield path, np.asarray(value)
        del values


def _read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir!r} has no config.json (expected a Hugging Face model "
                         "directory)")
    with open(path) as f:
        return json.load(f)


def hf_entries(hf_dir: str) -> dict[str, TensorEntry]:
    """{name: where it lies} over the directory's shards (model.safetensors.index.json, or a
    single model.safetensors); missing or truncated shards raise a ValueError naming them."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing:
            raise ValueError(f"{len(missing)} shard(s) listed in {INDEX_FILE} are missing from "
                             f"{hf_dir}: {missing[:5]}")
    elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
        weight_map, files = {}, [SINGLE_FILE]
    else:
        raise ValueError(f"{hf_dir!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    entries: dict[str, TensorEntry] = {}
    for fname in files:
        for name, entry in read_header(os.path.join(hf_dir, fname)).items():
            if name in entries:
                raise ValueError(f"tensor {name} is stored twice: in {entries[name].file} and "
                                 f"{entry.file}")
            entries[name] = entry
    for name, fname in weight_map.items():
        if name not in entries or os.path.basename(entries[name].file) != fname:
            raise ValueError(f"{INDEX_FILE} puts tensor {name} in {fname}, which does not "
                             "contain it")
    return entries


def _match_sources(cfg: ModelConfig, specs: list[TensorSpec],
                   leaves: dict[Path, jax.ShapeDtypeStruct], entries: dict[str, TensorEntry],
                   block: tuple[int, int]) -> list[_Source]:
    """Pair every released tensor of `specs` with its stored entry (and FP8 scale), checking
    names, shapes and dtypes; raises ValueError naming the tensor, the expected and the found."""
    expected = {s.name for s in specs}
    scales = {n for n in entries if n.endswith(SCALE_SUFFIX)}
    layout = (f"config: {cfg.n_layers} layers ({cfg.n_dense_layers} dense), "
              f"{cfg.n_routed_experts} experts, MTP depth {cfg.mtp_depth}")
    missing = sorted(expected - set(entries))
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. "
                         f"{missing[:3]} ({layout})")
    unknown = sorted(set(entries) - expected - scales)
    if unknown:
        raise ValueError(f"{len(unknown)} tensor name(s) not in the DeepSeek-V3 layout for this "
                         f"config, e.g. {unknown[:3]} ({layout})")
    for name in sorted(scales):
        weight = name[:-len(SCALE_SUFFIX)]
        if weight not in expected:
            raise ValueError(f"block scale {name} belongs to no tensor of this layout ({layout})")
        if entries[weight].dtype != "F8_E4M3":
            raise ValueError(f"block scale {name} belongs to {weight}, which is "
                             f"{entries[weight].dtype}, not F8_E4M3")
    out = []
    for spec in specs:
        entry = entries[spec.name]
        want = released_shape(leaves, spec)
        if entry.shape != want:
            raise ValueError(f"tensor {spec.name}: expected shape {want} for this config, found "
                             f"{entry.shape} in {os.path.basename(entry.file)}")
        scale = entries.get(spec.name + SCALE_SUFFIX)
        if entry.dtype == "F8_E4M3":
            if scale is None:
                raise ValueError(f"tensor {spec.name} is F8_E4M3 but {spec.name}{SCALE_SUFFIX} "
                                 "(its block scales) is missing")
            grid = tuple(-(-d // b) for d, b in zip(entry.shape, block, strict=True))
            if len(entry.shape) != 2 or scale.shape != grid:
                raise ValueError(f"block scale {scale.name}: expected shape {grid} (ceil of "
                                 f"{entry.shape} / {block}), found {scale.shape}")
            if scale.dtype not in ("F32", "BF16"):
                raise ValueError(f"block scale {scale.name} has dtype {scale.dtype}; expected "
                                 "F32 or BF16")
        elif entry.dtype not in ("F32", "BF16", "F16"):
            raise ValueError(f"tensor {spec.name} has dtype {entry.dtype}; supported: F32, "
                             "BF16, F16, and F8_E4M3 with weight_scale_inv block scales")
        out.append(_Source(spec, entry, scale))
    return out


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray,
                   block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """weight [out, in] FP8 E4M3 x scale_inv [ceil(out/bo), ceil(in/bi)] of its block -> float32.

    Each value is fp8 -> fp32 (exact) times its block's scale in fp32 (one rounding), as the
    official weight_dequant computes it; the last row/column blocks may be partial.
    """
    bo, bi = block
    n_in = weight.shape[1]
    w = weight.astype(np.float32)
    # [ceil(out/bo), in]: each row block's scales repeated across its columns.
    columns = np.repeat(scale_inv.astype(np.float32), bi, axis=1)[:, :n_in]
    for i in range(columns.shape[0]):
        w[i * bo:(i + 1) * bo] *= columns[i]
    return w


def load_released(entry: TensorEntry, scale: TensorEntry | None,
                  block: tuple[int, int]) -> np.ndarray:
    """One stored tensor as float32 [out, in] (FP8 dequantized with its block scales)."""
    raw = read_tensor(entry)
    if scale is not None:
        return dequantize_fp8(raw, read_tensor(scale), block)
    return raw.astype(np.float32)
