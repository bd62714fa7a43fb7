"""launch.compile: the real train and decode steps compiled by XLA:TPU and Mosaic TPU for
libtpu's compile-only v5p devices (no TPU attached), and the errors it gives before compiling."""

import subprocess
import sys

import pytest

from configs import tiny as tiny_config
from dsv3_jax.parallel import collectives, tpu_targets
from launch import compile as aot

# tiny is ~0.03 GB of state: XLA:TPU's fixed buffers (the 128-row tiles and padded layouts of a
# 64-wide model, the expert dispatch's sort and offload buffers) dominate it, so compiled memory
# is checked against the plan within a factor of 8 here; the README's rent table compares full-
# size models, where the two agree far closer.
FACTOR = 8.0


def tiny(**fields):
    cfg = tiny_config.get_config()
    with cfg.unlocked():
        cfg.model.attention_impl = "pallas"  # the Mosaic TPU kernels, compiled for real
        cfg.model.moe_impl = "pallas"
        for path, value in fields.items():
            node, *keys = path.split("__")
            target = cfg[node] if keys else cfg
            target[keys[0] if keys else node] = value
    return cfg


def kinds(program) -> dict[str, int]:
    return {k: s.ops for k, s in program.collectives.items() if s.ops}


@pytest.mark.parametrize("layout", [
    {"mesh__data": 2, "mesh__expert": 2},
    {"mesh__pipeline": 2, "mesh__data": 2, "mesh__expert": 1},
], ids=["data2xexpert2", "pipeline2xdata2"])
def test_tiny_train_step_compiles_for_v5p(layout):
    target = tpu_targets.target("v5p:2x2x1")
    check_plan = "mesh__pipeline" not in layout  # the second compile once, not per layout
    report = aot.train_report(tiny(**layout), target, check_plan=check_plan)
    (step,) = report.programs
    assert not step.refusal and report.fits
    assert step.arguments > 0 and step.temporaries > 0 and step.code > 0
    assert report.estimate / FACTOR < step.total < report.estimate * FACTOR, (
        step.total, report.estimate)
    assert step.bytes_accessed > 0
    found = kinds(step)
    # ZeRO: gradients reduce-scattered over `data` (XLA:TPU's all-reduce-scatter fusion).
    assert found.get("reduce-scatter", 0) > 0, found
    if layout.get("mesh__expert", 1) > 1:  # expert parallelism's token exchange
        assert found.get("all-to-all", 0) > 0, found
        assert step.collectives["all-to-all"].bytes_per_step > 0
    else:  # pipeline stages pass activations around the ring
        assert found.get("collective-permute", 0) > 0, found
    text = aot.format_report(report)
    assert "launch.plan's estimate" in text and "fits" in text
    if check_plan:  # compiled once more on a chip of the plan's bytes: one verdict printed
        checked = report.plan_check
        assert checked is not None and (checked.refusal or checked.total > 0)
        verdict = "is too small" if checked.refusal else "suffices"
        assert f"launch.plan's estimate {verdict}" in text


def test_a_chip_too_small_for_the_step_is_refused_with_xlas_figure():
    """The HBM cap the plan check uses: on a 'chip' of 1 MiB XLA:TPU refuses the step and says
    what it needs, and the refusal is reported as such, not raised."""
    target = tpu_targets.target("v5p:2x2x1")
    cfg = tiny(mesh__data=4, mesh__expert=1)
    spec = aot.run_spec(cfg, target)
    trainer = aot.Trainer(spec.model, spec.hyper, aot.parallel_layout(spec.mesh, target.devices),
                          backend="tpu")
    rows = (spec.hyper.batch_size, spec.hyper.seq_len + 1)
    batch = {k: aot.jax.ShapeDtypeStruct(rows, aot.jnp.int32, sharding=s)
             for k, s in trainer.batch_sharding.items()}
    program = aot.compile_program("train step", trainer.train_step,
                                  (trainer.abstract_state(), batch),
                                  trainer.parallel.mesh, hbm_cap=2**20)
    assert "exceeds available HBM" in program.refusal, program.refusal
    assert program.temporaries > 2**20  # XLA's stated requirement, parsed


def test_tiny_decode_compiles_for_v5p():
    target = tpu_targets.target("v5p:2x2x1")
    report = aot.decode_report(tiny(mesh__data=2, mesh__expert=2), target,
                               aot.Serving(batch=8, prompt_len=64, max_len=128))
    names = [p.name for p in report.programs]
    assert names == ["prefill", "decode step"]
    for program in report.programs:
        assert not program.refusal and program.total > 0
        assert kinds(program).get("all-to-all", 0) > 0  # routed experts, expert-parallel
    # The latent cache is an argument of both: the decode step's arguments hold it.
    assert report.programs[1].arguments >= report.estimate * 0.5


@pytest.mark.parametrize("name, topology, chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-1024", "v5p:8x8x8", 512), ("v5p-2048", "v5p:8x8x16", 1024),
    ("v6e-256", "v6e:16x16", 256), ("v6e-8", "v6e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16),
    ("v6e:4x4", "v6e:4x4", 16), ("v4:2x2x2", "v4:2x2x2", 8),
])
def test_slice_names(name, topology, chips):
    t = tpu_targets.target(name)
    assert (t.topology, t.chips) == (topology, chips)


@pytest.mark.parametrize("name, message", [
    ("v5p-7", "N must be 2 x a power of two"),
    ("v5p-12", "N must be 2 x a power of two"),
    ("v9x-8", "unknown slice family 'v9x'"),
    ("v5p:2x2", "a v5p slice has 3 torus axes"),
    ("v6e:2x2x2", "a v6e slice has 2 torus axes"),
    ("tpu", "is not a TPU slice"),
])
def test_bad_slice_names(name, message):
    with pytest.raises(ValueError, match=message):
        tpu_targets.target(name)


def test_multi_host_slice_devices():
    """A 256-host slice: every host's compile-only devices, no jax.distributed."""
    t = tpu_targets.target("v5p-2048")
    assert t.device_count == 1024
    assert len({d.process_index for d in t.devices}) > 1
    assert len(tpu_targets.target("v6e-8", num_slices=2).devices) == 16


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.compile", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--topology=v5p-7"], "N must be 2 x a power of two"),
    (["--topology=v5p:2x2x1", "--config.mesh.data=3"], "data=3"),
    (["--topology=v5p:2x2x1", "--config.mesh.expert=3", "--config.mesh.data=1"],
     "expert=3 = 3 devices, but 4 are available"),
    (["--topology=v5p:2x2x1", "--config.mesh.expert=4", "--config.mesh.data=1",
      "--config.model.n_routed_experts=6", "--config.model.n_expert_groups=1",
      "--config.model.n_limited_groups=1"], "expert=4 does not divide n_routed_experts=6"),
    (["--topology=v5p:2x2x1", "--config.batch_size=6"], "must divide over pipeline x data"),
    (["--topology=v5p:2x2x1", "--num_slices=0"], "--num_slices=0"),
    (["--topology=v5p:2x2x1", "--decode", "--batch=3"], "--batch=3"),
])
def test_cli_refuses_before_compiling(args, message):
    result = run_cli("--config=configs/tiny.py", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_collectives_parser_counts_loop_iterations():
    hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), dimensions={0}
  %ar-start = (f32[8]{0}, f32[8]{0}) all-reduce-start(%x), to_apply=%add
  %ar = f32[8]{0} all-reduce-done(%ar-start)
  ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[16] {
  %a = f32[8]{0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]) tuple(%z, %a)
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body
  %x = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %a2a = bf16[16]{0} all-to-all(%x), dimensions={0}
}
"""
    stats = collectives.of_hlo(hlo)
    assert stats["all-gather"].bytes_per_step == 5 * 32 * 4  # five iterations of 128 bytes
    assert (stats["all-reduce"].ops, stats["all-reduce"].async_ops) == (1, 1)
    assert stats["all-reduce"].bytes_per_step == 5 * 8 * 4
    assert stats["all-to-all"].bytes_per_step == 16 * 2
    assert stats["reduce-scatter"].ops == 0


def test_meshes_on_real_tori():
    """expert=64 on a 16x16 v6e torus splits a physical axis; over slices only `data` crosses
    the data-center network; a data axis the slices do not divide is refused."""
    from dsv3_jax.parallel import sharding

    mesh = sharding.make_mesh(1, 4, 64, devices=tpu_targets.target("v6e-256").devices)
    assert dict(mesh.shape) == {"pipeline": 1, "data": 4, "expert": 64}
    two = tpu_targets.target("v6e-16", num_slices=2).devices
    mesh = sharding.make_mesh(1, 4, 8, devices=two)
    for row in mesh.devices[0]:  # every expert group inside one slice
        assert len({d.slice_index for d in row}) == 1
    assert {d.slice_index for d in mesh.devices[0, :, 0]} == {0, 1}
    with pytest.raises(ValueError, match="data=1 must be a multiple of the 2 slices"):
        sharding.make_mesh(1, 1, 32, devices=two)


@pytest.mark.parametrize("error, gib", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
     "temporaries (9.24G) exceeds available HBM (8.30G). HLO module: jit__train_step.", 9.24),
    ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
     "of memory in memory space hbm. Used 31.25G of 31.24G hbm. Exceeded hbm capacity by 13.21M.",
     31.25),
])
def test_both_forms_of_xlas_out_of_memory_are_read(error, gib):
    program = aot.out_of_memory("train step", error, 1.0)
    assert program.temporaries == pytest.approx(gib * 2**30, rel=1e-3)
    assert program.refusal.startswith(("Ran out", "E1000"))


def test_activations_between_stacks_are_pinned_to_rows():
    """sharding.constrain_rows (after the embedding and after each stack): a replicated
    activation comes out split by rows over data x expert; rows that do not divide are left
    to XLA (a decode batch of one)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from dsv3_jax.parallel import sharding

    mesh = sharding.make_mesh(1, 2, 2, devices=tpu_targets.target("v5p:2x2x1").devices)
    parallel = sharding.Parallel(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def out_sharding(rows):
        x = jax.ShapeDtypeStruct((rows, 16, 128), jnp.bfloat16, sharding=replicated)
        step = jax.jit(lambda x: sharding.constrain_rows(parallel, x) * 2)
        return step.lower(x).compile().output_shardings

    by_rows = NamedSharding(mesh, PartitionSpec(("data", "expert"), None, None))
    assert out_sharding(8).is_equivalent_to(by_rows, 3)
    assert out_sharding(3).is_equivalent_to(replicated, 3)
