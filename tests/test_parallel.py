"""Data, expert, fully sharded and pipeline parallelism on 8 CPU devices equal one device."""

import json
import os
import subprocess
import sys

import pytest

from dsv3_jax.config import TINY
from dsv3_jax.parallel import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (pipeline, data, expert); the pipelined cases run 2 microbatches through the stages. Full
# parameter sharding, the circular schedule and uneven stages ride along on meshes the issue
# asks for, to keep CI's compile count down: (1,2,4) and (2,2,2) shard parameters over data
# too, and (4,2,1) splits 5 MoE layers into stages of 1, 2, 1 and 1 (4 MoE layers elsewhere).
MESHES = [
    {"mesh": [1, 8, 1], "fsdp": False},
    {"mesh": [1, 2, 4], "fsdp": True},
    {"mesh": [1, 1, 8], "fsdp": False},
    {"mesh": [2, 2, 2], "fsdp": True, "schedule": "circular"},
    {"mesh": [4, 2, 1], "fsdp": False, "schedule": "gpipe", "n_layers": 6},
]


@pytest.fixture(scope="module")
def results():
    out = subprocess.run(
        [sys.executable, "-m", "tests.parallel_worker", json.dumps(MESHES)], cwd=REPO,
        capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {_key(r): r for r in lines}


def _key(case):
    return (tuple(case["mesh"]), case["fsdp"], case.get("schedule"), case.get("n_layers", 5))


def _name(case):
    return "x".join(map(str, case["mesh"])) + ("-fsdp" if case["fsdp"] else "") + (
        f"-{case['schedule']}" if "schedule" in case else "") + (
        f"-{case['n_layers'] - 1}moe" if "n_layers" in case else "")


@pytest.mark.parametrize("case", MESHES, ids=_name)
def test_one_step_equals_the_single_device_step(results, case):
    r = results[_key(case)]
    assert r["devices"] == 8
    assert r["ref_moved"]  # the step moved every weight: the comparison means something
    # fp32 everywhere; only the order of reductions differs across layouts.
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"])
    assert r["params_rel_err"] < 1e-5
    assert r["bias_equal"]  # counts are integers: the bias update is exactly the same


@pytest.mark.parametrize("sizes, devices, message", [
    ((2, 3, 1), 8, r"pipeline=2 x data=3 x expert=1 = 6 devices, but 8 are available"),
    ((1, -1, 3), 8, r"8 devices do not divide into pipeline=1 x expert=3"),
    ((-1, -1, 1), 8, r"only one axis may be -1"),
    ((1, 0, 1), 8, r"positive integers or -1"),
])
def test_meshes_that_do_not_fit_the_devices_are_refused(sizes, devices, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(*sizes, devices)


@pytest.mark.parametrize("mesh, batch, micro, message", [
    ({"pipeline": 1, "data": 1, "expert": 3}, 12, 1, r"expert=3 does not divide n_routed_"
                                                     r"experts=16; expert sizes that fit"),
    ({"pipeline": 1, "data": 4, "expert": 2}, 12, 1, r"pipeline x data x expert = 8"),
    ({"pipeline": 4, "data": 1, "expert": 1}, 8, 1, r"pipeline=4 exceeds the 2 MoE layers"),
])
def test_models_that_do_not_divide_over_the_mesh_are_refused(mesh, batch, micro, message):
    with pytest.raises(ValueError, match=message):
        sharding.check_fits(TINY, mesh, batch, micro)


def test_pipeline_settings_that_cannot_run_are_refused():
    from dsv3_jax.parallel import pipeline

    with pytest.raises(ValueError, match=r"3 MoE layers cannot fill 2 stages x 2 repeats"):
        pipeline.check(pipeline.PipelineSpec(2, 4, "circular", 2), 3, 8)
    pipeline.check(pipeline.PipelineSpec(16, 32), 58, 64)  # uneven stages are fine
    with pytest.raises(ValueError, match="circular needs at least 2"):
        pipeline.check(pipeline.PipelineSpec(2, 4, "circular", 1), 4, 8)
    with pytest.raises(ValueError, match=r"do not split into mesh\.pipeline_microbatches=3"):
        pipeline.check(pipeline.PipelineSpec(2, 3), 4, 8)
    assert pipeline.PipelineSpec(4, 12).bubble_fraction() == pytest.approx(3 / 15)
    assert pipeline.PipelineSpec(4, 12, "circular", 2).bubble_fraction() == pytest.approx(3 / 27)


def test_one_table_maps_logical_axes():
    assert sharding.spec(("batch", None, "embed")) == sharding.PartitionSpec(
        ("data", "expert"), None, None)
    assert sharding.spec(("moe_layers", "experts", "embed", "expert_mlp"), fsdp=True) == \
        sharding.PartitionSpec("pipeline", "expert", "data", None)
    with pytest.raises(ValueError, match="twice"):
        sharding.spec(("batch", "embed"), fsdp=True)


def test_uneven_stages_balance_layers_and_still_split_storage():
    import types

    from dsv3_jax.parallel import pipeline

    sizes = pipeline.chunk_sizes(58, 16)  # DeepSeek-V3's MoE stack over 16 stages
    assert sum(sizes) == 58 and set(sizes) == {3, 4} and sizes[0] == sizes[-1] == 3
    assert pipeline.chunk_sizes(8, 4) == (2, 2, 2, 2)
    mesh = types.SimpleNamespace(shape={"pipeline": 4, "data": 2, "expert": 1})
    # 5 layers of [E=16, D=64, F=32] experts: `pipeline` moves to the largest dimension it
    # divides, so each of the 4 stages stores a quarter; `data` on 5 layers is just dropped.
    placed = sharding._drop_indivisible(sharding.PartitionSpec("pipeline", None, None, None),
                                        (5, 16, 64, 32), mesh)
    assert placed == sharding.PartitionSpec(None, None, "pipeline", None)
    assert sharding._drop_indivisible(sharding.PartitionSpec("data"), (5, 4), mesh) == \
        sharding.PartitionSpec(None, None)
