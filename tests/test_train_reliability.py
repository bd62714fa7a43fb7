"""The run's workdir under faults: every checkpoint unusable, a resume after a kill, two runs on
one workdir, a full disk, a workdir that cannot be written; and what a run prints at its end."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsv3_jax.train import loop as train_loop
from dsv3_jax.train import workdir as workdirs
from tests.test_train import FAST, REPO, config, losses


def records(workdir, name="metrics.jsonl"):
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(line) for line in f]


def train_steps(workdir, name="metrics.jsonl"):
    return [r["step"] for r in records(workdir, name) if "ce_loss" in r]


def spoil(checkpoint_dir):
    """Make one step's checkpoint unreadable (its state metadata)."""
    with open(os.path.join(checkpoint_dir, "state", "_METADATA"), "w") as f:
        f.write("{not json")


def test_every_checkpoint_unusable_refuses_a_silent_restart(tmp_path):
    train_loop.run(config(steps=8), str(tmp_path), progress=False)
    for step in (4, 8):
        spoil(tmp_path / "checkpoints" / str(step))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints can be restored: "
                       r"8\.corrupt-.*, 4\.corrupt-.* set aside .*allow_fresh_start=True"):
        train_loop.run(config(steps=8), str(tmp_path), progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing appended
    # A second attempt still refuses (the set-aside checkpoints are on disk, not in memory).
    with pytest.raises(ValueError, match="allow_fresh_start"):
        train_loop.run(config(steps=8), str(tmp_path), progress=False)
    # Allowed: it starts over, and the old series leaves metrics.jsonl instead of doubling it.
    train_loop.run(config(steps=8, allow_fresh_start=True), str(tmp_path), progress=False)
    assert train_steps(tmp_path) == list(range(1, 9))
    assert train_steps(tmp_path, workdirs.SUPERSEDED) == list(range(1, 9))
    assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if "corrupt" in d)


def test_a_resume_keeps_one_record_per_step(tmp_path):
    # As if killed after step 6 with the last checkpoint at 4: steps 5 and 6 are logged again.
    train_loop.run(config(steps=6), str(tmp_path), progress=False)
    first = {r["step"]: r for r in records(tmp_path) if "ce_loss" in r}
    os.rename(tmp_path / "checkpoints" / "6", tmp_path / "elsewhere")
    train_loop.run(config(steps=6), str(tmp_path), progress=False)
    assert train_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    moved = [r for r in records(tmp_path, workdirs.SUPERSEDED) if "ce_loss" in r]
    assert [r["step"] for r in moved] == [5, 6] and {r["resumed_from"] for r in moved} == {4}
    assert moved[0]["ce_loss"] == first[5]["ce_loss"]  # kept, not lost


def test_supersede_keeps_records_up_to_the_step_and_tolerates_a_torn_line(tmp_path):
    lines = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    assert workdirs.supersede_metrics(str(tmp_path), 2) == 2
    assert [r["step"] for r in records(tmp_path)] == [1, 2]
    assert workdirs.supersede_metrics(str(tmp_path), 2) == 0


def _holder(workdir):
    """A process holding the workdir's lock, as a running trainer does."""
    code = ("import sys, time; from dsv3_jax.train.workdir import WorkdirLock; "
            "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_workdir_is_refused_and_a_killed_holder_frees_it(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on "):
            train_loop.run(config(steps=2), str(tmp_path), progress=False)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL leaves no stale lock: the kernel released it with the process.
    workdirs.WorkdirLock(str(tmp_path)).acquire().release()


def test_two_trainers_on_one_workdir_one_refused(tmp_path):
    args = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
            f"--workdir={tmp_path}", "--config.steps=200"]
    args += [f"--config.{k}={v}" for k, v in FAST.items()]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(tmp_path / "metrics.jsonl"):  # training, so holding the lock
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"in use by another run (pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_ones(tmp_path):
    train_loop.run(config(steps=4), str(tmp_path), progress=False)
    # Writes past 256 KiB per file fail (EFBIG), as a full disk fails them (ENOSPC); the shell
    # sets the limit (and ignores SIGXFSZ) for the trainer it execs.
    args = ["bash", "-c", "ulimit -f 256; trap '' XFSZ; exec \"$@\"", "limited",
            sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
            f"--workdir={tmp_path}", "--config.steps=8"]
    args += [f"--config.{k}={v}" for k, v in FAST.items()]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint 8 could not be written to {tmp_path}")
    assert "no space left" in errors[0] and "free there" in errors[0]
    assert "earlier checkpoints are untouched (4)" in errors[0]
    # The earlier checkpoint restores (and the run completes once there is room).
    train_loop.run(config(steps=8), str(tmp_path), progress=False)
    assert sorted(losses(tmp_path)) == list(range(1, 9))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("x") and p, "is a file, not a directory"),
    (lambda p: p.write_text("x") and p / "run", "cannot be created: .* is a file"),
])
def test_a_workdir_that_cannot_be_a_directory_is_refused_before_compiling(
        tmp_path, monkeypatch, make, message):
    monkeypatch.setattr(train_loop, "Trainer", None)  # building one would fail loudly
    with pytest.raises(ValueError, match=message):
        train_loop.run(config(steps=2), str(make(tmp_path / "wd")), progress=False)


def test_an_unwritable_workdir_is_refused_naming_it(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # As root every directory is writable; the refusal is what a real EACCES/EROFS reaches.
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match=r"--workdir '.*run' cannot be written: .* refused a "
                       r"file \(Permission denied\)"):
        train_loop.run(config(steps=2), str(tmp_path / "run"), progress=False)


def test_bad_data_leaves_no_workdir_behind(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train_loop.run(config(**{"data.path": str(tmp_path / "none")}), str(tmp_path / "run"),
                       progress=False)
    assert not (tmp_path / "run").exists()


def test_the_run_ends_with_a_summary(tmp_path, capsys):
    last = train_loop.run(config(steps=4, eval_every=4), str(tmp_path), progress=False)
    out = capsys.readouterr().out.splitlines()
    evals = [r for r in records(tmp_path) if "eval_loss" in r]
    assert out[-2] == (f"done: step 4, train cross-entropy {last['ce_loss']:.4f} "
                       f"(MTP {last['mtp_loss']:.4f}), eval loss {evals[-1]['eval_loss']:.4f} "
                       f"at step 4")
    assert out[-1].startswith(f"  {4 * FAST['batch_size'] * FAST['seq_len']:,} tokens seen; "
                              f"wall time 00:0")
    assert out[-1].endswith(f"latest checkpoint {tmp_path / 'checkpoints' / '4'}")


def test_the_progress_bar_shows_the_cross_entropies():
    host = {"loss": 9.0, "ce_loss": 5.25, "mtp_loss": 5.5}
    assert train_loop.progress_fields(host, 1234.0, mtp_depth=1) == {
        "ce": "5.250", "mtp": "5.500", "tok/s": "1,234"}
    assert "mtp" not in train_loop.progress_fields(host, 1.0, mtp_depth=0)


@pytest.mark.parametrize("damage", ["truncate_arrays", "metadata"])
def test_restoring_past_a_corrupt_checkpoint_prints_no_traceback(tmp_path, damage):
    # Issue 20.14 reported a spurious "RuntimeError: Event loop is closed" traceback here.
    train_loop.run(config(steps=8), str(tmp_path), progress=False)
    step_dir = tmp_path / "checkpoints" / "8"
    if damage == "metadata":
        spoil(step_dir)
    else:
        for root, _, files in os.walk(step_dir / "state"):
            for name in files:
                if name not in ("_METADATA", "_sharding", "commit_success.txt"):
                    path = os.path.join(root, name)
                    os.truncate(path, max(os.path.getsize(path) // 2, 1))
    args = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
            f"--workdir={tmp_path}", "--config.steps=10"]
    args += [f"--config.{k}={v}" for k, v in FAST.items()]
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoints/8 cannot be used" in out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    assert sorted(losses(tmp_path)) == list(range(1, 11))


CLOSED_LOOP_RACE = """
import asyncio, sys, time
import numpy as np, tensorstore as ts
if sys.argv[2] == "trainer":
    import dsv3_jax.train.checkpointer  # what launch.train imports
arr = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": sys.argv[1]}},
              create=True, dtype=ts.float32, shape=[2048, 2048]).result()
arr.write(np.ones((2048, 2048), np.float32)).result()
loop = asyncio.new_event_loop()
async def read():
    return await arr.read()
task = loop.create_task(read())
loop.run_until_complete(asyncio.sleep(0))  # a read in flight, as when a restore fails
loop.close()
time.sleep(1)  # the read completes into the closed loop
"""


@pytest.mark.parametrize("process", ["plain", "trainer"])
def test_a_read_completing_into_a_closed_loop_prints_nothing_in_the_trainer(tmp_path, process):
    # Issue 20.14: what a failed restore leaves behind, made deterministic. In a plain process
    # Python prints the "Event loop is closed" traceback (the race is real); the trainer's
    # process drops exactly that one.
    out = subprocess.run([sys.executable, "-c", CLOSED_LOOP_RACE, str(tmp_path / "a"), process],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = "RuntimeError: Event loop is closed" in out.stderr
    assert printed == (process == "plain"), out.stderr[-2000:]


def test_the_first_steps_compile_is_left_out_of_the_rate(monkeypatch):
    """A run shorter than log_every logged compile time as throughput (89 tokens/s for a
    moonlight-shaped run on an H200): the window now starts once the first step is dispatched."""
    from dsv3_jax.train.run_spec import RunSpec

    spec = RunSpec.from_config(config(), devices=1, backend="cpu", processes=1)
    hyper = spec.hyper
    clock = iter([0.0, 60.0, 62.0, 62.0])  # start; compile done at 60 s; record at 62 s
    monkeypatch.setattr(train_loop.time, "perf_counter", lambda: next(clock))
    rate = train_loop.Throughput(spec.model, hyper)
    rate.stepped(logged=False)  # step 1: compiled, dispatched at 60 s
    rate.stepped(logged=False)
    rate.stepped(logged=False)  # steps 2 and 3 run by 62 s
    record = rate.record(3, {"expert_load": {"max_over_mean": [1.0], "bias_spread": [0.0]}})
    tokens = hyper.batch_size * hyper.seq_len
    assert record["tokens_per_sec"] == pytest.approx(2 * tokens / 2.0)
    assert record["step_time"] == pytest.approx(1.0)
