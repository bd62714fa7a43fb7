"""launch.convert: orbax <-> Hugging Face safetensors, streamed tensor by tensor.

Logit tolerance: as in tests/test_model_hf.py, max |ours - HF| <= 1e-4 * max |HF| in fp32: the
two frameworks differ only in summation order and formulation (O(1e-6) relative), while a wrong
tensor, a swapped layout or a lost bias moves logits by O(1e-1).
"""

import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

import dsv3_jax
from configs import tiny
from dsv3_jax.checkpoints import load_variables
from dsv3_jax.config import HF_REQUIRED, ModelConfig
from dsv3_jax.convert import stream as convert
from dsv3_jax.convert.orbax_files import OrbaxReader
from dsv3_jax.convert.released import tensor_map
from dsv3_jax.convert.safetensors_io import read_header
from dsv3_jax.model.layers import rope_attention_factor, rope_frequencies
from dsv3_jax.tokenizer import ByteTokenizer
from dsv3_jax.train import loop as train_loop
from dsv3_jax.train import run_spec
from launch.convert import main as convert_main
from tests.hf_reference import random_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dsv3_jax.preset("tiny")
VARIANTS = {
    "tiny": TINY,  # q_lora on; 16 experts in 4 groups, 2 kept
    # q_lora off; 8 groups of 2 experts, 3 kept: many experts masked by the group limit.
    "no_q_lora_eight_groups": TINY.replace(q_lora_rank=0, n_expert_groups=8,
                                           n_limited_groups=3),
}


# Helpers -----------------------------------------------------------------------------------------

def random_variables(cfg, seed):
    """Random numpy variables (no compilation): N(0, 0.02^2) matrices, norm scales 1 +- 0.2,
    router biases of both signs."""
    rng = np.random.default_rng(seed)

    def draw(keys, leaf):
        names = [k.key for k in keys]
        if names[-1] == "scale":
            value = 1 + 0.2 * rng.standard_normal(leaf.shape)
        elif names[0] == "router_bias":
            value = rng.uniform(-0.05, 0.05, leaf.shape)
        else:
            value = 0.02 * rng.standard_normal(leaf.shape)
        return value.astype(np.float32)

    abstract = nn.meta.unbox(dsv3_jax.abstract_variables(cfg))
    return jax.tree_util.tree_map_with_path(draw, abstract)


def save_trainer_like(step_dir, cfg, variables, tokenizer=None):
    """A step directory as the trainer writes it (orbax's own save: state + meta items)."""
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        str(step_dir), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave({"params": variables["params"],
                                       "router_bias": variables["router_bias"]}),
            meta=ocp.args.JsonSave({"model": dataclasses.asdict(cfg), "tokenizer": tokenizer})))


def write_hf_dir(path, cfg, tensors, config_extra=None):
    """A Hugging Face directory with a single model.safetensors (no index); tensors are numpy
    arrays or torch tensors."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**cfg.to_hf(), **(config_extra or {})}, f)
    file = os.path.join(path, "model.safetensors")
    if any(isinstance(v, torch.Tensor) for v in tensors.values()):
        tensors = {k: v.clone() if isinstance(v, torch.Tensor) else torch.from_numpy(v.copy())
                   for k, v in tensors.items()}
        safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    else:
        safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def restore(path, cfg):
    variables, meta = load_variables(str(path), dsv3_jax.abstract_variables(cfg))
    return jax.tree.map(np.asarray, variables), meta


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (keys, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, keys
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(keys))


def hf_tensors(hf_dir):
    out = {}
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        out.update(safetensors.torch.load_file(path))
    return out


def relative_max_error(ours, ref):
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def no_partial_dirs(parent):
    return not [d for d in os.listdir(parent) if ".partial-" in d]


# A tiny model imported from Hugging Face files and trained by the trainer ------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, workdir, imported variables): random weights written as a Hugging Face directory,
    imported by hf-to-orbax, then trained for 4 steps by train_loop.run (what launch.train
    runs) with --config.init_from pointing at the import."""
    root = tmp_path_factory.mktemp("trained")
    imported = random_variables(TINY, seed=7)
    write_hf_dir(root / "hf", TINY, dsv3_jax.to_hf_state_dict(TINY, imported))
    convert.hf_to_orbax(str(root / "hf"), str(root / "imported"), progress=False)
    run = tiny.get_config()
    # The shapes of tests/test_train.py, so the persistent compilation cache is shared.
    for key, value in dict(steps=4, batch_size=4, seq_len=64, log_every=1, eval_every=1000,
                           eval_batches=1, checkpoint_every=4,
                           init_from=str(root / "imported")).items():
        run[key] = value
    train_loop.run(run, str(root / "run"), progress=False)
    assert run_spec.model_config(run) == TINY
    return TINY, root / "run", imported


# Tests -------------------------------------------------------------------------------------------

def test_round_trip_orbax_hf_orbax_is_bit_exact(trained, tmp_path):
    cfg, workdir, imported = trained
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    # Small shards, so that several files and the index are exercised.
    assert convert_main(["orbax-to-hf", f"--checkpoint={workdir}", f"--out={hf_dir}",
                         "--dtype=fp32", "--max_shard_size=100KB", "--no_progress"]) == 0
    assert convert_main(["hf-to-orbax", f"--hf_dir={hf_dir}", f"--out={back}",
                         "--max_shard_size=50KB", "--no_progress"]) == 0
    original, _ = restore(workdir, cfg)
    again, meta = restore(back, cfg)
    assert_trees_equal(original, again)
    # What must survive is really there: a router bias moved by training, and the MTP module.
    bias = original["router_bias"]["moe_layers"]["moe"]["bias"]
    assert not np.array_equal(bias, imported["router_bias"]["moe_layers"]["moe"]["bias"])
    assert dsv3_jax.ModelConfig(**meta["model"]) == cfg

    with open(hf_dir / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 3
    assert set(weight_map) == {s.name for s in tensor_map(cfg)}
    tensors = hf_tensors(hf_dir)  # plain PyTorch tensors
    mtp = f"model.layers.{cfg.n_layers}"
    np.testing.assert_array_equal(tensors[f"{mtp}.eh_proj.weight"].numpy(),
                                  original["params"]["mtp_0"]["eh_proj"].T)
    np.testing.assert_array_equal(tensors[f"{mtp}.mlp.gate.e_score_correction_bias"].numpy(),
                                  original["router_bias"]["mtp_0"]["block"]["moe"]["bias"])
    np.testing.assert_array_equal(tensors["model.layers.2.mlp.gate.e_score_correction_bias"],
                                  bias[1])
    with open(hf_dir / "config.json") as f:
        config = json.load(f)
    assert config["model_type"] == "deepseek_v3"
    assert config["num_nextn_predict_layers"] == 1
    assert config["eos_token_id"] == ByteTokenizer.eos_id
    assert no_partial_dirs(tmp_path)


def test_bf16_export_keeps_the_router_bias_float32(trained, tmp_path):
    cfg, workdir, _ = trained
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    convert.orbax_to_hf(str(workdir), str(hf_dir), dtype="bf16", progress=False)
    original, _ = restore(workdir, cfg)
    entries = {}
    for path in glob.glob(str(hf_dir / "*.safetensors")):
        entries.update(read_header(path))
    for name, entry in entries.items():
        want = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        assert entry.dtype == want, name
    tensors = hf_tensors(hf_dir)
    np.testing.assert_array_equal(  # round to nearest even, as torch's .to(bfloat16)
        tensors["model.embed_tokens.weight"].float().numpy(),
        original["params"]["embed"].astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.gate.e_score_correction_bias"],
                                  original["router_bias"]["moe_layers"]["moe"]["bias"][0])
    # Stored as bf16 in orbax too, restored as float32 with the same values.
    convert.hf_to_orbax(str(hf_dir), str(back), dtype="bf16", progress=False)
    stored = OrbaxReader(str(back)).array(("params", "moe_layers", "moe", "w_gate"))
    assert stored.dtype.numpy_dtype == np.dtype(ml_dtypes.bfloat16)
    again, _ = restore(back, cfg)
    rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32),
                           original["params"])
    assert_trees_equal(rounded, again["params"])
    assert_trees_equal(original["router_bias"], again["router_bias"])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exported_logits_match_transformers(name, tmp_path):
    cfg = VARIANTS[name]
    variables = random_variables(cfg, seed=len(name))
    save_trainer_like(tmp_path / "ckpt", cfg, variables)
    convert.orbax_to_hf(str(tmp_path / "ckpt"), str(tmp_path / "hf"), dtype="fp32",
                        progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert model.dtype == torch.float32
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    ours = dsv3_jax.forward(cfg, variables, tokens).logits
    assert relative_max_error(ours, ref) < 1e-4


def test_import_of_a_transformers_save_pretrained_directory(tmp_path, capsys):
    """What transformers itself writes (sharded, with an index) imports exactly. Its config
    keeps num_nextn_predict_layers=1 but its files hold no MTP layer: the main model is imported
    with MTP depth 0, or with --mtp=init a fresh MTP module equal to what training's
    initialization draws, and one line says which."""
    cfg = TINY  # MTP depth 1
    model, tensors = random_hf_model(cfg, seed=11)
    saved = tmp_path / "saved"
    model.save_pretrained(str(saved), max_shard_size="100KB")
    assert os.path.isfile(saved / "model.safetensors.index.json")
    with open(saved / "config.json") as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1
    assert not any(n.startswith(f"model.layers.{cfg.n_layers}.") for n in tensors)
    capsys.readouterr()

    assert convert_main(["hf-to-orbax", f"--hf_dir={saved}", f"--out={tmp_path / 'ckpt'}",
                         "--no_progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    assert "holds no MTP tensor (model.layers.3.*" in notes[0]
    assert "imported the main model with MTP depth 0" in notes[0]
    variables, meta = restore(tmp_path / "ckpt", cfg.replace(mtp_depth=0))
    assert meta["model"]["mtp_depth"] == 0 and meta["source"]["mtp"] == "absent: depth 0"
    ours = dsv3_jax.to_hf_state_dict(cfg.replace(mtp_depth=0), variables)
    assert set(ours) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

    assert convert_main(["hf-to-orbax", f"--hf_dir={saved}", f"--out={tmp_path / 'with_mtp'}",
                         "--mtp=init", "--seed=3", "--max_shard_size=20KB",
                         "--no_progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "initialized 1 MTP module(s) afresh" in notes[0], notes
    variables, meta = restore(tmp_path / "with_mtp", cfg)
    assert meta["model"]["mtp_depth"] == 1
    fresh = jax.tree.map(np.asarray, dsv3_jax.init(cfg, jax.random.key(3)))
    assert_trees_equal(variables["params"]["mtp_0"], fresh["params"]["mtp_0"])
    assert_trees_equal(variables["router_bias"]["mtp_0"], fresh["router_bias"]["mtp_0"])
    ours = dsv3_jax.to_hf_state_dict(cfg, variables)
    for name, value in tensors.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)

    # Any other missing tensor is still refused by name, MTP or not.
    gone = "model.layers.2.mlp.experts.5.up_proj.weight"
    expect_import_error(tmp_path, mutated(tmp_path, {k: v for k, v in tensors.items()
                                                     if k != gone}, "no_expert"), gone)
    mtp = f"model.layers.{cfg.n_layers}"
    full = dict(tensors, **{k: v for k, v in dsv3_jax.to_hf_state_dict(
        cfg, random_variables(cfg, 0)).items() if k.startswith(mtp)})
    expect_import_error(tmp_path, mutated(tmp_path, {k: v for k, v in full.items()
                                                     if k != f"{mtp}.eh_proj.weight"},
                                          "mtp_incomplete"), f"{mtp}.eh_proj.weight")


def quantize_fp8(w, block=128):
    """Per 128x128 block: scale = amax / 448 (E4M3's largest), q = fp8(w / scale)."""
    out, inn = w.shape
    scale = torch.empty(math.ceil(out / block), math.ceil(inn / block))
    q = torch.empty(out, inn, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (
                tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_block_scaled_import_dequantizes_exactly(tmp_path):
    # Dims above 128 and not multiples of it: full and partial blocks in both directions.
    cfg = TINY.replace(dim=200, inter_dim=300, moe_inter_dim=136, q_lora_rank=136,
                       kv_lora_rank=40, n_heads=2, n_routed_experts=4, n_expert_groups=2,
                       n_limited_groups=1, n_activated_experts=2, vocab_size=260, n_layers=2)
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in
            dsv3_jax.to_hf_state_dict(cfg, random_variables(cfg, seed=3)).items()}
    stored, reference = {}, {}
    for name, w in bf16.items():
        # As in the released files: linear weights FP8, the router, embedding, head and norms
        # bf16, the bias float32.
        if name.endswith("e_score_correction_bias"):
            stored[name] = reference[name] = w.float()
        elif w.ndim == 2 and not any(k in name for k in ("embed_tokens", "head", "gate.weight")):
            q, scale = quantize_fp8(w.float())
            stored[name], stored[name + "_scale_inv"] = q, scale
            expand = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
            reference[name] = q.float() * expand[:w.shape[0], :w.shape[1]]
        else:
            stored[name] = w
            reference[name] = w.float()
    partial = [n for n, w in reference.items() if w.ndim == 2 and w.shape[0] > 128
               and w.shape[1] > 128 and w.shape[0] % 128 and w.shape[1] % 128 and
               n + "_scale_inv" in stored]
    assert partial  # some tensors have full and partial blocks along both dims
    hf_dir = tmp_path / "fp8"
    os.makedirs(hf_dir)
    config = {**cfg.to_hf(), "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128]}}
    with open(hf_dir / "config.json", "w") as f:
        json.dump(config, f)
    safetensors.torch.save_file(stored, str(hf_dir / "model.safetensors"),
                                metadata={"format": "pt"})

    convert.hf_to_orbax(str(hf_dir), str(tmp_path / "ckpt"), progress=False)
    variables, _ = restore(tmp_path / "ckpt", cfg)
    ours = dsv3_jax.to_hf_state_dict(cfg, variables)
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        np.testing.assert_array_equal(ours[name], ref.numpy(), err_msg=name)


def test_peak_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """The bound: the peak RSS of converting the big model minus that of the same process after
    converting the tiny model (interpreter, jax, tensorstore, tracing) stays within
    6 x the largest released tensor in float32 (a tensor read, converted, laid out and cast;
    the FP8 and MTP-copy checks hold two) + 6 x the shard/commit size (tensorstore holds a
    commit's chunks decoded, encoded and in the OCDBT data file buffer) + 64 MiB (tensorstore's
    thread pools, zstd contexts and per-thread malloc arenas; measured at 30-50 MiB here).
    The model is 4x the bound and one of its stacked leaves alone exceeds it. Peak RSS is the
    conversion process's VmHWM: on Linux ru_maxrss (RUSAGE_SELF or RUSAGE_CHILDREN) also counts
    the pytest parent's RSS inherited through fork and exec, which would hide everything."""
    cfg = TINY.replace(vocab_size=2048, dim=256, inter_dim=512, moe_inter_dim=128, n_layers=8,
                       n_routed_experts=128, n_expert_groups=4, n_limited_groups=2,
                       q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32)
    shard = 4 * 2**20
    largest = convert.largest_tensor_bytes(cfg)
    bound = 6 * largest + 6 * shard + 64 * 2**20
    total = dsv3_jax.param_counts(cfg)["total_released"] * 4
    w_gate = math.prod(convert.leaf_shapes(cfg)[("params", "moe_layers", "moe", "w_gate")].shape)
    assert total > 4 * bound and w_gate * 4 > bound

    # The big model, written in the test process (not measured), in several shards.
    big = tmp_path / "big"
    os.makedirs(big)
    with open(big / "config.json", "w") as f:
        json.dump(cfg.to_hf(), f)
    rng = np.random.default_rng(0)
    leaves = convert.leaf_shapes(cfg)
    specs = tensor_map(cfg)
    shared = {s.name: rng.standard_normal(convert.released_shape(leaves, s), np.float32)
              for s in specs if s.name in ("model.embed_tokens.weight", "lm_head.weight")}
    weight_map, batch, size = {}, {}, 0
    for i, spec in enumerate(specs):
        if spec.shared:
            owner = "model.embed_tokens.weight" if "embed" in spec.name else "lm_head.weight"
            batch[spec.name] = shared[owner]
        else:
            batch[spec.name] = shared.get(spec.name, rng.standard_normal(
                convert.released_shape(leaves, spec), np.float32))
        size += batch[spec.name].nbytes
        if size > 64 * 2**20 or i == len(specs) - 1:
            fname = f"part-{len(set(weight_map.values())):03d}.safetensors"
            safetensors.numpy.save_file(batch, str(big / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(batch, fname))
            batch, size = {}, 0
    with open(big / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    small = tmp_path / "small"
    write_hf_dir(small, TINY, dsv3_jax.to_hf_state_dict(TINY, random_variables(TINY, 0)))

    def peak_growth(command, small_args, big_args):
        script = textwrap.dedent(f"""
            from launch.convert import main
            def peak():  # this process's own high-water mark (VmHWM, bytes)
                with open("/proc/self/status") as f:
                    line = next(l for l in f if l.startswith("VmHWM:"))
                return int(line.split()[1]) * 1024
            assert main({small_args!r}) == 0
            base = peak()
            assert main({big_args!r}) == 0
            print("PEAKS", base, peak())
        """)
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        base, peak = (int(x) for x in run.stdout.split("PEAKS")[1].split())
        print(f"{command}: peak RSS {peak / 2**20:.0f} MiB, after the tiny model "
              f"{base / 2**20:.0f} MiB; growth {(peak - base) / 2**20:.0f} MiB, bound "
              f"{bound / 2**20:.0f} MiB, model {total / 2**20:.0f} MiB")
        return peak - base

    flags = [f"--max_shard_size={shard}", "--no_progress", "--dtype=fp32"]
    growth = peak_growth(
        "hf-to-orbax",
        ["hf-to-orbax", f"--hf_dir={small}", f"--out={tmp_path / 'small_ckpt'}", *flags],
        ["hf-to-orbax", f"--hf_dir={big}", f"--out={tmp_path / 'ckpt'}", *flags])
    assert growth < bound
    growth = peak_growth(
        "orbax-to-hf",
        ["orbax-to-hf", f"--checkpoint={tmp_path / 'small_ckpt'}",
         f"--out={tmp_path / 'small_hf'}", *flags],
        ["orbax-to-hf", f"--checkpoint={tmp_path / 'ckpt'}", f"--out={tmp_path / 'hf'}",
         *flags])
    assert growth < bound

    # The streamed conversions are exact at this size too (many shards, many commits).
    assert len(glob.glob(str(tmp_path / "hf" / "*.safetensors"))) > 20
    source = {}
    for path in glob.glob(str(big / "*.safetensors")):
        source.update(safetensors.numpy.load_file(path))
    back = hf_tensors(tmp_path / "hf")
    assert set(back) == set(source)
    for name, value in source.items():
        np.testing.assert_array_equal(back[name].numpy(), value, err_msg=name)


def test_trained_model_generates_the_same_greedy_tokens_in_transformers(trained, tmp_path):
    cfg, workdir, _ = trained
    convert.orbax_to_hf(str(workdir), str(tmp_path / "hf"), dtype="fp32", progress=False)
    variables, _ = restore(workdir, cfg)
    tok = ByteTokenizer()
    prompt = [tok.bos_id, *tok.encode("def main():\n    return")]
    n = 16
    # dsv3_jax.generate is what `python -m launch.generate` runs; plain and MTP-speculative.
    ours = dsv3_jax.generate(cfg, variables, [prompt], max_new_tokens=n,
                             eos_id=tok.eos_id).tokens[0]
    speculative = dsv3_jax.generate(cfg, variables, [prompt], max_new_tokens=n,
                                    eos_id=tok.eos_id, speculative="mtp").tokens[0]
    assert speculative == ours

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        sequence = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                  pad_token_id=tok.pad_id)
    theirs = sequence[0, len(prompt):].tolist()
    # Both stop at the end-of-text token (config.json eos_token_id); transformers keeps it.
    if theirs and theirs[-1] == tok.eos_id:
        theirs = theirs[:-1]
    assert list(ours) == theirs and len(ours) > 0


def test_imported_checkpoint_fine_tunes_with_init_from(trained):
    """hf-to-orbax output is what `launch.train --config.init_from=DIR` starts from: after four
    small steps every leaf is within a few percent of the imported weights, which are random
    and independent of the run's own seeded initialization (two such draws differ by about
    sqrt(2) in relative norm)."""
    cfg, workdir, imported = trained
    tuned, _ = restore(workdir, cfg)
    for x, y in zip(jax.tree.leaves(tuned["params"]), jax.tree.leaves(imported["params"]),
                    strict=True):
        assert np.linalg.norm(x - y) / np.linalg.norm(y) < 0.2
    assert any(not np.array_equal(x, y) for x, y in zip(
        jax.tree.leaves(tuned["params"]), jax.tree.leaves(imported["params"]), strict=True))


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    import tokenizers

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "def": 3, "main": 4, "return": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf_dir = tmp_path / "hf"
    write_hf_dir(hf_dir, TINY, dsv3_jax.to_hf_state_dict(TINY, random_variables(TINY, 1)),
                 {"bos_token_id": 0, "eos_token_id": 1})
    tok.save(str(hf_dir / "tokenizer.json"))
    convert.hf_to_orbax(str(hf_dir), str(tmp_path / "ckpt"), progress=False)
    _, meta = restore(tmp_path / "ckpt", TINY)
    assert meta["tokenizer"] == {"kind": "hf", "path": str(tmp_path / "ckpt" / "tokenizer.json")}
    # A moved checkpoint still finds its own copy; orbax ignores the file beside its items.
    os.rename(tmp_path / "ckpt", tmp_path / "moved")
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(str(tmp_path / "moved"))
    convert.orbax_to_hf(str(tmp_path / "moved"), str(tmp_path / "out"), progress=False)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert loaded("def main return", add_special_tokens=False)["input_ids"] == [3, 4, 5]
    assert loaded.eos_token == "</s>"
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["eos_token_id"] == 1


# Errors: raised before anything is written, naming the tensor, the expected and the found. -----

@pytest.fixture
def good_hf(tmp_path):
    """A valid single-file HF directory of the tiny model and its tensors."""
    tensors = dsv3_jax.to_hf_state_dict(TINY, random_variables(TINY, 2))
    return tmp_path / "good", tensors


def mutated(tmp_path, tensors, name="bad", config_extra=None):
    path = tmp_path / name
    write_hf_dir(path, TINY, tensors, config_extra)
    return path


def expect_import_error(tmp_path, hf_dir, *fragments):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        convert.hf_to_orbax(str(hf_dir), str(out), progress=False)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    assert not out.exists() and no_partial_dirs(tmp_path)


def test_import_errors_name_the_tensor_the_expected_and_the_found(good_hf, tmp_path):
    _, tensors = good_hf
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    wrong = dict(tensors, **{name: np.zeros((5, 7), np.float32)})
    expect_import_error(tmp_path, mutated(tmp_path, wrong, "shape"), name,
                        str(tensors[name].shape), "(5, 7)")

    missing = {k: v for k, v in tensors.items() if k != name}
    expect_import_error(tmp_path, mutated(tmp_path, missing, "missing"), "missing", name)

    extra = dict(tensors, **{"model.layers.0.mlp.unknown.weight": np.zeros(3, np.float32)})
    expect_import_error(tmp_path, mutated(tmp_path, extra, "unknown"),
                        "model.layers.0.mlp.unknown.weight")

    as_int = dict(tensors, **{name: tensors[name].astype(np.int32)})
    expect_import_error(tmp_path, mutated(tmp_path, as_int, "dtype"), name, "I32", "F8_E4M3")

    fp8 = dict(tensors, **{name: torch.from_numpy(tensors[name]).to(torch.float8_e4m3fn)})
    expect_import_error(tmp_path, mutated(tmp_path, fp8, "noscale"), name, "_scale_inv")

    # A config that does not match the tensors: every shape is checked before writing.
    expect_import_error(tmp_path, mutated(tmp_path, tensors, "config",
                                          {"hidden_size": TINY.dim * 2}),
                        "model.embed_tokens.weight", f"({TINY.vocab_size}, {TINY.dim * 2})")


def test_missing_and_truncated_shards_and_late_failures_leave_no_output(good_hf, tmp_path):
    hf_dir, tensors = good_hf
    write_hf_dir(hf_dir, TINY, tensors)
    exported = tmp_path / "sharded"
    convert.hf_to_orbax(str(hf_dir), str(tmp_path / "ckpt"), progress=False)
    convert.orbax_to_hf(str(tmp_path / "ckpt"), str(exported), dtype="fp32",
                        max_shard_bytes=200_000, progress=False)
    shards = sorted(glob.glob(str(exported / "model-*.safetensors")))
    assert len(shards) > 2

    os.rename(shards[1], shards[1] + ".moved")
    expect_import_error(tmp_path, exported, "missing", os.path.basename(shards[1]))
    os.rename(shards[1] + ".moved", shards[1])

    with open(shards[2], "r+b") as f:
        f.truncate(os.path.getsize(shards[2]) - 100)
    expect_import_error(tmp_path, exported, os.path.basename(shards[2]), "truncated")

    # Found only while converting (the data, not the headers, is wrong): nothing is left.
    mtp_embed = f"model.layers.{TINY.n_layers}.embed_tokens.weight"
    differs = dict(tensors, **{mtp_embed: tensors[mtp_embed] + 1})
    expect_import_error(tmp_path, mutated(tmp_path, differs, "shared"), mtp_embed,
                        "model.embed_tokens.weight")

    # An existing output is never overwritten.
    with pytest.raises(ValueError, match="already exists"):
        convert.hf_to_orbax(str(hf_dir), str(tmp_path / "ckpt"), progress=False)


def test_export_errors(tmp_path, capsys):
    cfg = TINY
    variables = random_variables(cfg, 4)
    step = tmp_path / "step"
    save_trainer_like(step, cfg, variables)
    # The meta's model config no longer matches the stored arrays.
    with open(step / "meta" / "metadata") as f:
        meta = json.load(f)
    meta["model"]["moe_inter_dim"] = 48
    with open(step / "meta" / "metadata", "w") as f:
        json.dump(meta, f)
    out = tmp_path / "hf"
    assert convert_main(["orbax-to-hf", f"--checkpoint={step}", f"--out={out}",
                         "--no_progress"]) == 2
    err = capsys.readouterr().err
    # The first mismatching leaf in tree order, with both shapes.
    assert "params.moe_layers.moe.shared.w_down: expected shape (2, 48, 64)" in err
    assert "found (2, 32, 64)" in err
    assert not out.exists() and no_partial_dirs(tmp_path)

    assert convert_main(["orbax-to-hf", f"--checkpoint={tmp_path / 'nowhere'}",
                         f"--out={out}", "--no_progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    tokenizer = {"kind": "hf", "path": str(tmp_path / "gone" / "tokenizer.json")}
    save_trainer_like(tmp_path / "step2", cfg, variables, tokenizer)
    with pytest.raises(ValueError, match=r"gone/tokenizer\.json"):
        convert.orbax_to_hf(str(tmp_path / "step2"), str(out), progress=False)
    assert not out.exists()


# Interrupted conversions: what a killed run left is removed by the next run, and nothing else. -

MIDWAY = textwrap.dedent("""
    import sys, time
    from dsv3_jax.convert import stream as convert
    with convert._staging(sys.argv[1]) as partial:
        with open(partial + "/model-00001-of-00002.safetensors", "w") as f:
            f.write("half written")
        print(partial, flush=True)
        time.sleep(300)
""")


@pytest.fixture
def midway():
    """start(out): a conversion to `out` in another process, stopped midway through writing, as
    (the process, its partial directory). kill(process) (SIGKILL: none of its cleanup runs)
    leaves the partial as a killed conversion does; any still running die with the test."""
    started = []

    def start(out):
        proc = subprocess.Popen([sys.executable, "-c", MIDWAY, str(out)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        partial = proc.stdout.readline().strip()
        assert partial, "the conversion did not start"
        return proc, partial

    yield start
    for proc in started:
        kill(proc)


def kill(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


def killed_conversions(midway, out, n=1):
    """The partial directories of `n` conversions to `out` run at once and killed midway (one
    run after another would each remove the last one's)."""
    started = [midway(out) for _ in range(n)]
    for proc, partial in started:
        kill(proc)
        assert os.path.isdir(partial)
    return [partial for _, partial in started]


@pytest.fixture
def sources(tmp_path):
    """{direction: what it converts}: the same tiny model as a Hugging Face directory and as a
    trainer's step directory."""
    variables = random_variables(TINY, 3)
    write_hf_dir(tmp_path / "src" / "hf", TINY, dsv3_jax.to_hf_state_dict(TINY, variables))
    save_trainer_like(tmp_path / "src" / "step", TINY, variables)
    return {"hf-to-orbax": tmp_path / "src" / "hf", "orbax-to-hf": tmp_path / "src" / "step"}


def convert_cli(direction, source, out):
    flag = "--hf_dir" if direction == "hf-to-orbax" else "--checkpoint"
    return convert_main([direction, f"{flag}={source}", f"--out={out}", "--no_progress"])


def notes(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def removed_note(*partials):
    return (f"note: removed {len(partials)} stale partial output(s) of an interrupted "
            f"conversion: {', '.join(sorted(partials))}")


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


@pytest.mark.parametrize("direction", ["hf-to-orbax", "orbax-to-hf"])
def test_the_partial_output_of_a_killed_conversion_is_removed_by_the_next(direction, sources,
                                                                          midway, tmp_path,
                                                                          capsys):
    out = tmp_path / "outs" / "model"
    stale = killed_conversions(midway, out, 2)
    assert convert_cli(direction, sources[direction], out) == 0
    assert notes(capsys) == [removed_note(*stale)]
    assert os.listdir(out.parent) == ["model"]
    assert convert.PARTIAL_LOCK not in os.listdir(out)


def test_completed_outputs_and_other_outputs_partials_are_never_removed(sources, midway,
                                                                          tmp_path, capsys):
    parent = tmp_path / "outs"
    out = parent / "hf"
    [stale] = killed_conversions(midway, out)
    killed_conversions(midway, parent / "hf2")
    killed_conversions(midway, parent / "hf-old")
    killed_conversions(midway, parent / "hf.partial-final")  # hf.partial-final.partial-*
    # hf.partial-12345678 has a partial's name but no lock file: someone else's, or that of a
    # conversion between making it and locking it.
    for completed in ("hf2", "hf.partial-12345678/sub"):
        os.makedirs(parent / completed)
        (parent / completed / "config.json").write_text("{}")
    os.makedirs(out)  # a completed `out`: refused, and nothing is removed
    (out / "config.json").write_text("{}")
    before = files_under(parent)
    assert convert_cli("orbax-to-hf", sources["orbax-to-hf"], out) == 2
    assert "already exists" in capsys.readouterr().err
    assert files_under(parent) == before

    shutil.rmtree(out)
    kept = [f for f in before if not f.startswith(("hf/", os.path.basename(stale) + "/"))]
    assert convert_cli("orbax-to-hf", sources["orbax-to-hf"], out) == 0
    assert notes(capsys) == [removed_note(stale)]
    assert [f for f in files_under(parent) if not f.startswith("hf/")] == kept


def test_a_running_conversion_s_partial_output_is_left_alone(sources, midway, tmp_path,
                                                             capsys):
    out = tmp_path / "outs" / "hf"
    (killed, stale), (_, running) = midway(out), midway(out)
    kill(killed)
    assert convert_cli("orbax-to-hf", sources["orbax-to-hf"], out) == 0
    assert notes(capsys) == [removed_note(stale)]
    assert files_under(running) == [convert.PARTIAL_LOCK, "model-00001-of-00002.safetensors"]
    assert sorted(os.listdir(out.parent)) == ["hf", os.path.basename(running)]


def test_without_flock_conversions_run_and_remove_nothing(sources, midway, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "outs" / "hf"
    [stale] = killed_conversions(midway, out)

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks available")

    monkeypatch.setattr(convert.fcntl, "flock", no_flock)
    assert convert_cli("orbax-to-hf", sources["orbax-to-hf"], out) == 0
    assert notes(capsys) == []
    assert sorted(os.listdir(out.parent)) == ["hf", os.path.basename(stale)]
    assert convert.PARTIAL_LOCK not in os.listdir(out)


def test_written_checkpoint_metadata_matches_what_orbax_writes(tmp_path):
    """Our slice-by-slice writer and orbax's own save of the same numpy tree agree on the
    pytree metadata (so a newer orbax that changes its format fails here first)."""
    variables = random_variables(TINY, 5)
    write_hf_dir(tmp_path / "hf", TINY, dsv3_jax.to_hf_state_dict(TINY, variables))
    convert.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    ocp.PyTreeCheckpointer().save(str(tmp_path / "orbax"), jax.tree.map(np.asarray, variables))
    with open(tmp_path / "ours" / "state" / "_METADATA") as f:
        ours = json.load(f)
    with open(tmp_path / "orbax" / "_METADATA") as f:
        theirs = json.load(f)
    assert ours == theirs
    # And orbax restores it with no target at all.
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(str(tmp_path / "ours"))
    assert_trees_equal(jax.tree.map(np.asarray, variables), restored["state"])
    assert restored["meta"]["model"] == dataclasses.asdict(TINY)


# config.json: a missing field is read as transformers reads it, or refused by name ---------------

# Every value unlike transformers' DeepseekV3Config defaults, so that dropping a field changes
# the model wherever a default applies.
UNLIKE_DEFAULTS = TINY.replace(n_shared_experts=2, route_scale=1.5, norm_eps=1e-5,
                               rope_theta=50000.0, max_seq_len=1024, original_seq_len=1024,
                               mtp_depth=2, init_std=0.01)
# The fields whose transformers default differs from UNLIKE_DEFAULTS' value.
DEFAULTED = {"num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
             "rms_norm_eps", "max_position_embeddings", "rope_theta", "num_nextn_predict_layers",
             "initializer_range"}


def transformers_reading(hf):
    """The model transformers reads from a config.json dict (its defaults filled in), as a
    ModelConfig of the fields it then holds."""
    return ModelConfig.from_hf(transformers.DeepseekV3Config(**hf).to_dict())


def test_missing_config_fields_take_transformers_defaults_or_are_refused():
    full = UNLIKE_DEFAULTS.to_hf()
    assert ModelConfig.from_hf(full) == transformers_reading(full) == UNLIKE_DEFAULTS
    assert set(HF_REQUIRED) <= set(full)
    changed = set()
    for name in full:
        dropped = {k: v for k, v in full.items() if k != name}
        if name in HF_REQUIRED:
            with pytest.raises(ValueError, match=f"config.json has no {name}: it sets the shapes"):
                ModelConfig.from_hf(dropped)
            continue
        ours = ModelConfig.from_hf(dropped)
        assert ours == transformers_reading(dropped), name
        if ours != UNLIKE_DEFAULTS:
            changed.add(name)
    assert changed == DEFAULTED
    # The MTP depth's other spelling (transformers' attribute alias) is read too.
    del full["num_nextn_predict_layers"]
    assert ModelConfig.from_hf(dict(full, num_mtp_layers=0)).mtp_depth == 0


def transformers_rope(hf):
    """(inv_freq, cos/sin scale, softmax scale) of transformers' DeepseekV3 for `hf`."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_model

    config = transformers.DeepseekV3Config(**hf)
    rotary = hf_model.DeepseekV3RotaryEmbedding(config)
    return (rotary.inv_freq.numpy(), rotary.attention_scaling,
            hf_model.DeepseekV3Attention(config, layer_idx=0).scaling)


@pytest.mark.parametrize("drop", [("type",), ("rope_type",), ("type", "rope_type"),
                                  ("beta_fast",), ("beta_slow",), ("mscale", "mscale_all_dim"),
                                  ("factor",), ("original_max_position_embeddings",),
                                  ("mscale",), ("mscale_all_dim",)])
def test_missing_yarn_fields_are_read_as_transformers_reads_them(drop):
    """Dropped rope_scaling fields: the rotation frequencies, the cos/sin scale and the softmax
    scale equal transformers' for the same dict, or the dict is refused naming the field."""
    cfg = TINY.replace(max_seq_len=4096, original_seq_len=256, rope_factor=16.0, beta_fast=16,
                       beta_slow=2, mscale=0.8, mscale_all_dim=0.9)
    hf = cfg.to_hf()
    hf["rope_scaling"] = {k: v for k, v in hf["rope_scaling"].items() if k not in drop}
    refused = {  # transformers refuses it too, or reads what ModelConfig cannot hold
        ("factor",): "has no factor",
        ("original_max_position_embeddings",): "has no original_max_position_embeddings",
        ("mscale",): "mscale_all_dim=0.9 without mscale",
        ("mscale_all_dim",): "mscale=0.8 without mscale_all_dim"}
    if drop in refused:
        with pytest.raises(ValueError, match=refused[drop]):
            ModelConfig.from_hf(hf)
        return
    ours = ModelConfig.from_hf(hf)
    inv_freq, cos_sin_scale, softmax_scale = transformers_rope(hf)
    np.testing.assert_allclose(rope_frequencies(ours), inv_freq, rtol=1e-6)
    assert rope_attention_factor(ours) == pytest.approx(cos_sin_scale, rel=1e-12)
    assert ours.softmax_scale == pytest.approx(softmax_scale, rel=1e-12)


def test_import_without_routing_fields_is_the_model_transformers_loads(tmp_path, capsys):
    """The bug report's directory: config.json without routed_scaling_factor, n_group and
    topk_group. hf-to-orbax and transformers read the same model from it (same logits); without
    hidden_size the launcher refuses it in one line naming the file and the field."""
    cfg = TINY.replace(mtp_depth=0)
    variables = random_variables(cfg, seed=8)
    hf_dir = tmp_path / "hf"
    write_hf_dir(hf_dir, cfg, dsv3_jax.to_hf_state_dict(cfg, variables))
    with open(hf_dir / "config.json") as f:
        config = json.load(f)
    for name in ("routed_scaling_factor", "n_group", "topk_group"):
        del config[name]
    with open(hf_dir / "config.json", "w") as f:
        json.dump(config, f)
    assert convert_main(["hf-to-orbax", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'ckpt'}",
                         "--no_progress"]) == 0
    imported, meta = restore(tmp_path / "ckpt", cfg.replace(route_scale=2.5, n_expert_groups=8,
                                                           n_limited_groups=4))
    ours = ModelConfig(**meta["model"])
    assert (ours.route_scale, ours.n_expert_groups, ours.n_limited_groups) == (2.5, 8, 4)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens)).logits.numpy()
    assert relative_max_error(dsv3_jax.forward(ours, imported, tokens).logits, ref) < 1e-4
    capsys.readouterr()

    del config["hidden_size"]
    with open(hf_dir / "config.json", "w") as f:
        json.dump(config, f)
    assert convert_main(["hf-to-orbax", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'again'}",
                         "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {hf_dir / 'config.json'} has no hidden_size: ")
    assert err.count("\n") == 1 and not (tmp_path / "again").exists()
