"""Finding and reading a saved run: one step directory from a workdir, its `checkpoints`
directory or the step itself; its meta (model config, run config, tokenizer); the model config
and tokenizer it records; and its params and router bias. Training (`init_from`), conversion
and generation all resolve checkpoints here, and find a checkpoint's tokenizer here
(`tokenizer_file`; a checkpoint may keep its own copy, `own_tokenizer` and `copy_tokenizer`).

  workdir/checkpoints/<step>/{state, data, meta}    as the trainer writes them
  <dir>/{state, meta, tokenizer*.json}             as launch.convert hf-to-orbax writes them

Imports `dsv3_jax.config` and `dsv3_jax.tokenizer` only (orbax when variables are loaded).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from dsv3_jax.config import ModelConfig
from dsv3_jax.tokenizer import ByteTokenizer, HFTokenizer

STATE, META = "state", "meta"
# A Hugging Face tokenizer's files: tokenizer.json, then what transformers also reads beside it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def step_dir(path: str) -> str:
    """A workdir, its `checkpoints` directory or one step directory -> the step directory (the
    latest step)."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    if not os.path.isdir(os.path.join(path, STATE)):
        steps = sorted(int(d) for d in os.listdir(path) if d.isdigit())
        if not steps:
            raise ValueError(f"{path!r} holds no checkpoint: no step directories and no "
                             f"'{STATE}' item (expected a trainer workdir, its checkpoints "
                             "directory, or one step's directory)")
        path = os.path.join(path, str(steps[-1]))
    return path


def step_meta(step: str) -> dict[str, Any]:
    """The step directory's own `meta` item (JSON)."""
    path = os.path.join(step, META, "metadata")
    if not os.path.isfile(path):
        raise ValueError(f"{step!r} has no {META}/metadata: not a dsv3-jax checkpoint")
    with open(path) as f:
        return json.load(f)


def model_config(meta: dict, meta_dir: str) -> ModelConfig:
    """The ModelConfig a meta records."""
    if "model" not in meta:
        raise ValueError(f"the meta in {meta_dir} has no 'model' entry: the model config is "
                         "unknown")
    try:
        return ModelConfig(**meta["model"])
    except TypeError as e:
        raise ValueError(f"the model config recorded in {meta_dir} does not fit this version of "
                         f"ModelConfig: {e}") from e


def read_meta(path: str) -> tuple[dict, str]:
    """(meta dict with "model" and "tokenizer", the directory it came from): the meta of the
    step `load_variables` restores (its latest step), else the run's config.json (the
    lenient lookup generation uses; conversion reads a step's own meta with `step_meta`)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is not a directory")
    ckpt = os.path.join(path, "checkpoints")
    ckpt = ckpt if os.path.isdir(ckpt) else path
    step_dirs = [path] if os.path.isdir(os.path.join(path, "state")) else [
        os.path.join(ckpt, str(step))
        for step in sorted((int(d) for d in os.listdir(ckpt) if d.isdigit()), reverse=True)[:1]]
    candidates = [os.path.join(d, "meta", name) for d in step_dirs
                  for name in ("metadata", "config.json")]
    candidates.append(os.path.join(path, "config.json"))
    if os.path.basename(path).isdigit():  # a step directory: its run's config.json
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(path)), "config.json"))
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate) as f:
                try:
                    meta = json.load(f)
                except json.JSONDecodeError:
                    continue
            if isinstance(meta, dict) and isinstance(meta.get("model"), dict):
                return meta, os.path.dirname(candidate)
    raise ValueError(f"no model config found for {path!r}: looked for a checkpoint's meta "
                     "(meta/metadata, meta/config.json) and a trainer workdir's config.json with "
                     "a 'model' entry")


def recorded_tokenizer(spec: dict | None, meta_dir: str):
    """The tokenizer a checkpoint's meta records (None when it records none: token-id data)."""
    if spec is None:
        return None
    if spec.get("kind") == "bytes":
        return ByteTokenizer()
    return HFTokenizer(tokenizer_file(spec, meta_dir))


def tokenizer_file(spec: dict | None, meta_dir: str) -> str | None:
    """Where the Hugging Face tokenizer.json a checkpoint's meta records (`spec`, read from
    `meta_dir`) is now: its recorded path, else a copy beside the meta, else the checkpoint's own
    copy beside its items (`own_tokenizer`), which a moved checkpoint still finds. None when the
    meta records no such file (no tokenizer, or the byte-level one)."""
    if spec is None or spec.get("kind") == "bytes":
        return None
    if spec.get("kind") != "hf":
        raise ValueError(f"unknown tokenizer record {spec!r}; expected kind 'bytes' or 'hf'")
    recorded = spec["path"]
    own = os.path.join(os.path.dirname(meta_dir), TOKENIZER_FILES[0])
    for candidate in (recorded, os.path.join(meta_dir, os.path.basename(recorded)), own):
        if os.path.isfile(candidate):
            return candidate
    raise ValueError(f"the checkpoint's tokenizer {recorded!r} is not there any more, nor a copy "
                     f"beside the checkpoint ({own!r}); pass one explicitly "
                     "(--tokenizer=PATH/tokenizer.json; launch.convert also takes "
                     "--tokenizer=none)")


def own_tokenizer(step: str) -> dict:
    """The meta's tokenizer record of a checkpoint that keeps its own copy of a Hugging Face
    tokenizer beside its items (as launch.convert hf-to-orbax writes it; see copy_tokenizer)."""
    return {"kind": "hf", "path": os.path.join(step, TOKENIZER_FILES[0])}


def copy_tokenizer(tokenizer_json: str, directory: str) -> list[str]:
    """Copy a Hugging Face tokenizer into `directory`: `tokenizer_json` (when it is a file) as
    tokenizer.json, and the other TOKENIZER_FILES found beside it. Returns the names copied."""
    copied = []
    sources = [(tokenizer_json, TOKENIZER_FILES[0])] + [
        (os.path.join(os.path.dirname(tokenizer_json), name), name)
        for name in TOKENIZER_FILES[1:]]
    for src, name in sources:
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(directory, name))
            copied.append(name)
    return copied


def load_variables(path: str, abstract_variables: Any) -> tuple[Any, dict]:
    """Params and router bias from a checkpoint written by the trainer or launch.convert.

    `path` is a run's workdir, its `checkpoints` directory, or one step's directory.
    Returns (variables {"params", "router_bias"}, meta).
    """
    import flax.linen as nn  # imported on use: reading a meta needs neither
    import orbax.checkpoint as ocp

    path = step_dir(path)
    handler = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    # dsv3_jax.abstract_variables is boxed (logical-axis metadata); the stored tree is not.
    abstract_variables = nn.meta.unbox(abstract_variables)
    target = {"params": abstract_variables["params"],
              "router_bias": abstract_variables["router_bias"]}
    try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        restored = handler.restore(path, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                         partial_restore=True),
            meta=ocp.args.JsonRestore()))
    except Exception as e:
        raise ValueError(f"cannot restore params/router_bias from {path!r} for this model "
                         f"config: {type(e).__name__}: {str(e)[:500]}") from e
    return restored["state"], restored["meta"]
