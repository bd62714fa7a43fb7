"""launch.plan sizes a job without devices: the 671B model on 2048 GPUs against a hand count
of its parameters, a mesh too small to fit, meshes that cannot be built, and the single flag
changes it prints for a layout that does not fit or that the trainer refuses."""

import ast
import math
import os
import subprocess
import sys

import pytest

import dsv3_jax
from configs import deepseek_v3_671b, small, tiny
from dsv3_jax.train import run_spec
from launch import plan as planner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2048  # the paper's cluster: pipeline 16 x expert 64 x data 2


def config_671b(**mesh):
    cfg = deepseek_v3_671b.get_config()
    # 16384 sequences (the paper's 15360 does not split over 2048 devices) in 8 accumulation
    # steps of 16 pipeline microbatches: one sequence per device inside the stages.
    cfg.batch_size, cfg.microbatches = 16384, 8
    cfg.mesh.pipeline, cfg.mesh.expert, cfg.mesh.data, cfg.mesh.fsdp = 16, 64, -1, False
    cfg.mesh.pipeline_microbatches = 16
    for k, v in mesh.items():
        cfg.mesh[k] = v
    return cfg


def hand_count(c):
    """Parameters of one layer of each kind, from the architecture (SPEC.md): not from the code
    under test. Checked against dsv3_jax.param_counts below."""
    D, N, Q, R, Hr = c.dim, c.n_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
    attention = (D * Q + Q + Q * N * (c.qk_nope_head_dim + Hr)  # wq_a, q_norm, wq_b
                 + D * (R + Hr) + R + R * N * (c.qk_nope_head_dim + c.v_head_dim)  # wkv_a/norm/b
                 + N * c.v_head_dim * D)  # wo
    norms = 2 * D
    expert = 3 * D * c.moe_inter_dim
    return {
        "dense_layer": attention + norms + 3 * D * c.inter_dim,
        "moe_layer_without_routed": attention + norms + D * c.n_routed_experts
        + c.n_shared_experts * expert,
        "expert": expert,
        "embed_head_final": 2 * c.vocab_size * D + D,
        "mtp_extra": 2 * D * D + 3 * D,  # eh_proj, enorm, hnorm, head_norm
    }


def test_671b_on_2048_gpus_matches_a_hand_count():
    c = dsv3_jax.preset("deepseek_v3_671b")
    h = hand_count(c)
    moe_layer = h["moe_layer_without_routed"] + c.n_routed_experts * h["expert"]
    counts = dsv3_jax.param_counts(c)
    assert (c.n_dense_layers * h["dense_layer"] + c.n_moe_layers * moe_layer
            + h["embed_head_final"]) == counts["main"]
    assert counts["mtp"] - c.mtp_depth * 2 * c.vocab_size * c.dim == c.mtp_depth * (
        moe_layer + h["mtp_extra"])

    plan = planner.make_plan(config_671b(), DEVICES, 141)
    assert plan.mesh == {"pipeline": 16, "data": 2, "expert": 64}
    layers_per_stage = math.ceil(58 / 16)  # 4: stages hold ceil(L / P) MoE layers
    local_experts = 256 // 64
    expected = {  # fp32 elements per device; only the routed experts and MoE stack are split
        "MoE layers": layers_per_stage * (h["moe_layer_without_routed"]
                                          + local_experts * h["expert"]),
        "dense layers": c.n_dense_layers * h["dense_layer"],
        "embedding, head, final norm": h["embed_head_final"],
        "MTP modules": c.mtp_depth * (h["moe_layer_without_routed"] + h["mtp_extra"]
                                      + local_experts * h["expert"]),
        "router bias (not trained)": (layers_per_stage + c.mtp_depth) * c.n_routed_experts,
    }
    assert plan.params == {k: 4 * v for k, v in expected.items()}
    trained = 4 * (sum(expected.values()) - expected["router bias (not trained)"])
    # ZeRO-1: every leaf has a free dimension that data=2 divides, so mu + nu are halved, and
    # so is the accumulated gradient sum (8 accumulation steps: the sum and the current one).
    assert plan.optimizer == 2 * trained // 2
    # The current microbatch's gradients: fp32 for what the model uses in fp32 (norm scales,
    # router, embedding, head), bf16 for the matmul weights (cast once per step).
    D, E = c.dim, c.n_routed_experts
    norms = 2 * D + c.q_lora_rank + c.kv_lora_rank  # attn, mlp, q and kv norms
    kept_fp32 = (layers_per_stage * (norms + E * D) + c.n_dense_layers * norms
                 + h["embed_head_final"] + c.mtp_depth * (norms + E * D + 3 * D))
    microbatch = 4 * kept_fp32 + 2 * (trained // 4 - kept_fp32)
    assert plan.gradients == microbatch + trained // 2
    # About 23 GB of fp32 parameters per device.
    assert 22e9 < plan.param_total < 24e9
    assert plan.activations["saved"] > 0 and plan.activations["working"] > 0
    assert plan.fits and plan.total < 141e9
    assert any("ceil(58 / 16) = 4 MoE layers" in a for a in plan.assumptions)


def test_pipeline_activations_follow_the_iteration_count():
    """Saved MoE values: n = M + P - 1 iterations of ceil(L/P) layers on tokens_in tokens, each
    keeping its layer inputs (remat=full: D x bf16 per token) and the stage's state buffer."""
    c = dsv3_jax.preset("deepseek_v3_671b")
    m16 = planner.make_plan(config_671b(pipeline_microbatches=16), DEVICES)
    m8 = planner.make_plan(config_671b(pipeline_microbatches=8), DEVICES)
    tokens_in = {16: 2048 // 16 // 128 * 4096, 8: 2048 // 8 // 128 * 4096}
    n = {16: 16 + 16 - 1, 8: 8 + 16 - 1}
    per_token = (math.ceil(58 / 16) + 1) * c.dim * 2
    assert m8.activations["saved"] - m16.activations["saved"] == per_token * (
        n[8] * tokens_in[8] - n[16] * tokens_in[16])
    assert (m16.params, m16.optimizer) == (m8.params, m8.optimizer)


def test_remat_full_without_pipeline_saves_the_layer_inputs():
    cfg = tiny.get_config()
    cfg.model.mtp_depth, cfg.model.remat = 0, "full"
    plan = planner.make_plan(cfg, 4)  # data=4: 16 sequences of 128 tokens, 4 per device
    c = run_spec.model_config(cfg)
    tokens = 16 // 4 * 128
    # fp32 (4 bytes): every layer's input, plus the embedding and the final norm's input, plus
    # the fused loss's gradients kept from its forward pass (head [D, V] and hidden [tokens, D]).
    layers = tokens * (c.n_layers + 2) * c.dim * 4
    loss = (c.dim * c.vocab_size + tokens * c.dim) * 4
    assert plan.activations["saved"] == layers + loss


def test_a_mesh_too_small_for_the_model_does_not_fit():
    cfg = deepseek_v3_671b.get_config()
    cfg.mesh.pipeline, cfg.mesh.expert, cfg.mesh.data = 1, 64, 1
    plan = planner.make_plan(cfg, 64, 141)
    assert not plan.fits
    # 58 MoE layers of 4 experts each and everything else replicated: > 90 GB of fp32 params.
    assert plan.param_total > 90e9
    assert "does NOT fit" in planner.format_plan(plan)


@pytest.mark.parametrize("mesh, devices, message", [
    ({"pipeline": 4, "expert": 512}, 2048, r"expert=512 does not divide n_routed_experts=256; "
                                           r"expert sizes that fit: \[1, 2, 4, 8, 16, 32, 64, "
                                           r"128, 256\]"),
    ({}, 2000, r"2000 devices do not divide into pipeline=16 x expert=64 = 1024"),
    ({"pipeline": 64, "data": 1, "expert": 32}, 2048, r"pipeline=64 exceeds the 58 MoE layers"),
])
def test_meshes_that_cannot_be_built_are_refused(mesh, devices, message):
    with pytest.raises(ValueError, match=message):
        planner.make_plan(config_671b(**mesh), devices)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_command_line_reports_fits_does_not_fit_and_errors():
    big = ["--config=configs/deepseek_v3_671b.py", "--config.batch_size=16384",
           "--config.microbatches=8", "--config.mesh.pipeline_microbatches=16",
           "--config.mesh.pipeline=16", "--config.mesh.fsdp=False"]
    fits = run_plan(*big, f"--devices={DEVICES}")
    assert fits.returncode == 0, fits.stderr[-2000:]
    assert "mesh pipeline=16 x data=2 x expert=64 = 2048 devices" in fits.stdout
    assert "ZeRO-1 over data=2" in fits.stdout and "\nfits: " in fits.stdout

    small = run_plan("--config=configs/deepseek_v3_671b.py", "--config.mesh.pipeline=1",
                     "--config.mesh.data=1", "--devices=64")
    assert small.returncode == 1, small.stderr[-2000:]
    assert "does NOT fit" in small.stdout and "Traceback" not in small.stderr

    bad = run_plan(*big, "--config.mesh.expert=48", f"--devices={DEVICES}")
    assert bad.returncode == 2
    assert ("error: mesh: 2048 devices do not divide into pipeline=16 x expert=48 = 768"
            in bad.stderr)


def with_flag(cfg, flag: str):
    """`cfg` with one printed `--config.a.b=value` override applied, as the command line would."""
    path, text = flag.removeprefix("--config.").split("=", 1)
    *sections, field = path.split(".")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare string: --config.model.remat=full
    cfg = cfg.copy_and_resolve_references()
    node = cfg
    for section in sections:
        node = node[section]
    node[field] = value
    return cfg


def printed_changes(stdout: str) -> list[tuple[str, float, bool]]:
    """(flag, total GB, fits) of every single flag change launch.plan printed."""
    rows = []
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  --config.") and parts[2] == "GB":
            rows.append((parts[0], float(parts[1]), " ".join(parts[3:]) == "fits"))
    return rows


CIRCULAR_TOO_FEW = ["--config.batch_size=16384", "--config.microbatches=8",
                    "--config.mesh.pipeline=16", "--config.mesh.fsdp=False",
                    "--config.mesh.pipeline_schedule=circular",
                    "--config.mesh.pipeline_microbatches=8"]


@pytest.mark.parametrize("module, args, devices, memory, heading", [
    # small on one 80 GB GPU: more microbatches fit.
    (small, [], 1, 80, "single flag changes that lower it"),
    # 671B on 64 GPUs: nothing single fits, said so, with the lowest totals still shown.
    (deepseek_v3_671b, [], 64, 141, "no single flag change fits"),
    # Fits in memory, but the trainer refuses a circular pipeline of 8 < 16 microbatches.
    (deepseek_v3_671b, CIRCULAR_TOO_FEW, DEVICES, 141, "single flag changes the trainer accepts"),
])
def test_a_layout_that_cannot_run_prints_flag_changes_with_their_totals(module, args, devices,
                                                                        memory, heading):
    out = run_plan(f"--config=configs/{module.__name__.split('.')[-1]}.py", *args,
                   f"--devices={devices}", f"--device_memory_gb={memory}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"\n{heading}" in out.stdout, out.stdout
    rows = printed_changes(out.stdout)
    assert 0 < len(rows) <= planner.SHOWN, out.stdout
    assert [r[1] for r in rows] == sorted(r[1] for r in rows)
    assert any(fits for _, _, fits in rows) == (heading != "no single flag change fits")
    cfg = module.get_config()
    for arg in args:
        cfg = with_flag(cfg, arg)
    base = planner.make_plan(cfg, devices, memory)
    for flag, total, fits in rows:  # each printed total is that flag's own plan
        plan = planner.make_plan(with_flag(cfg, flag), devices, memory)
        assert (round(plan.total / planner.GB, 2), plan.fits, plan.warnings) == (total, fits, ())
        assert base.warnings or plan.total < base.total


def test_flash_attention_is_suggested_on_gpu_and_tpu():
    """XLA attention keeps [N, T] scores per token: on both backends the Pallas kernel is a
    single flag change that lowers the total (auto takes it on both for deepseek_v3_671b)."""
    cfg = deepseek_v3_671b.get_config()
    cfg.model.attention_impl = "xla"
    cfg.mesh.pipeline, cfg.mesh.data = 1, 1
    for backend in ("gpu", "tpu"):
        options = dict(planner.alternatives(cfg, 64, 141, backend))
        pallas = options["--config.model.attention_impl=pallas"]
        assert pallas.total < planner.make_plan(cfg, 64, 141, backend).total
        flash = with_flag(cfg, "--config.model.attention_impl=pallas")
        assert planner.make_plan(flash, 64, 141, backend) == pallas
        assert f"attention=pallas (pallas on {backend})" in planner.format_plan(pallas)
    auto = deepseek_v3_671b.get_config()
    auto.mesh.pipeline, auto.mesh.data = 1, 1
    assert "attention=pallas (auto on tpu)" in planner.format_plan(
        planner.make_plan(auto, 64, 141, "tpu"))


def test_bf16_moments_halve_the_optimizer_term_only():
    """optimizer.moments_dtype=bfloat16: mu and nu take 2 bytes each instead of 4, so the
    optimizer term halves exactly; the accumulated gradient sum stays fp32, and nothing else
    moves."""
    fp32 = planner.make_plan(config_671b(), DEVICES, 141)
    cfg = config_671b()
    cfg.optimizer.moments_dtype = "bfloat16"
    bf16 = planner.make_plan(cfg, DEVICES, 141)
    assert bf16.optimizer * 2 == fp32.optimizer > 0
    assert (bf16.params, bf16.gradients, bf16.activations) == (
        fp32.params, fp32.gradients, fp32.activations)
    assert fp32.total - bf16.total == fp32.optimizer // 2
    assert "AdamW mu+nu bf16" in planner.format_plan(bf16)
