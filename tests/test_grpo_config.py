"""GRPO's rewards, prompts and settings without a model: the built-in rewards, `module:function`
rewards, prompt datasets (.jsonl, .parquet), templates, the resumable prompt stream, and bad
settings refused before anything is compiled (also from the command line)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import base, grpo_tiny
from dsv3_jax.rl import prompts, rewards
from dsv3_jax.rl.spec import GRPOSpec
from dsv3_jax.train.run_spec import model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_of(init_from="", tokenizer="bytes", **grpo):
    cfg = base.get_config()
    cfg.batch_size = 16
    cfg.init_from, cfg.data.tokenizer = init_from, tokenizer
    for k, v in grpo.items():
        cfg.grpo[k] = v
    return GRPOSpec.from_config(cfg, model_config(cfg))


def length_reward(record, completion):  # a `module:function` reward for the tests
    return float(len(completion))


@pytest.mark.parametrize("completion, answer, expected", [
    ("7", "7", 1.0), ("xx 7", "7", 1.0), ("3 then 07", "7", 1.0), ("7 then 3", "7", 0.0),
    ("<think>2+5</think><answer>7</answer>", "7", 1.0), ("<answer>7</answer> 9", "7", 1.0),
    ("<answer> seven </answer>", "seven", 1.0), ("nothing", "7", 0.0), ("7.0", "7", 1.0),
])
def test_exact_match_reads_the_final_answer(completion, answer, expected):
    assert rewards.exact_match({"answer": answer}, completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0), (" <think>a\nb</think>\n<answer>c</answer> ", 1.0),
    ("<answer>b</answer>", 0.0), ("<think>a</think>", 0.0),
    ("<think>a</think><answer>b</answer> extra", 0.0),
])
def test_the_format_reward_is_r1_zeros(completion, expected):
    assert rewards.format_reward({}, completion) == expected


def test_rewards_resolve_built_ins_and_module_paths_with_weights():
    resolved = rewards.resolve([("exact_match", 1.0), ("length_penalty", 0.5),
                                ("tests.test_grpo_config:length_reward", 2)], 10)
    scored = rewards.score(resolved, [{"answer": "3"}] * 2, ["3", "abcde"])
    assert scored.per_reward["length_penalty"] == [-0.1, -0.5]
    assert scored.per_reward["tests.test_grpo_config:length_reward"] == [1.0, 5.0]
    assert scored.totals == [1.0 - 0.05 + 2.0, 0.0 - 0.25 + 10.0] and scored.failures == 0


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, r"grpo.group_size=1 must be an integer >= 2"),
    ("epsilon", 0.0, r"grpo.epsilon=0.0 must lie in \(0, 1\)"),
    ("epsilon", 1.0, r"grpo.epsilon=1.0 must lie in \(0, 1\)"),
    ("epsilon_high", -0.1, r"grpo.epsilon_high=-0.1 must be > 0"),
    ("beta", -1.0, r"grpo.beta=-1.0 must be >= 0"),
    ("temperature", 0.0, r"grpo.temperature=0.0 must be > 0"),
    ("aggregation", "tokens", r"grpo.aggregation='tokens' is not one of token, sequence"),
    ("max_new_tokens", 128, r"grpo.max_new_tokens=128 must be an integer in \[1, seq_len=128\)"),
    ("rewards", (("no_such_module_x:f", 1.0),),
     r"'no_such_module_x:f': module 'no_such_module_x' does not import"),
    ("rewards", (("os:no_such_fn", 1.0),), r"module 'os' has no callable 'no_such_fn'"),
    ("rewards", (("exactmatch", 1.0),), r"'exactmatch' is neither a built-in reward"),
    ("rewards", (("exact_match",),), r"is not a \(name, weight\) pair"),
    ("template", "no fields", r"grpo.template='no fields' is neither a template name"),
    ("prompts", "/nonexistent.jsonl", r"grpo.prompts='/nonexistent.jsonl': no such file"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        spec_of(**{field: value})


def test_prompts_that_do_not_fit_or_fill_the_template_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "x" * 70})
                    + "\n")
    with pytest.raises(ValueError, match=r"record 1 takes 71 tokens .* leaves 64"):
        spec_of(prompts=str(path))
    with pytest.raises(ValueError, match=r"cannot be filled from record 0 \(KeyError: 'hint'\)"):
        spec_of(prompts=str(path), template="{prompt} {hint}")


def test_the_batch_must_hold_whole_groups():
    with pytest.raises(ValueError, match=r"batch_size=16 .* multiple of grpo.group_size=6"):
        spec_of(group_size=6)


def test_a_bad_setting_is_refused_from_the_command_line_before_compiling(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.grpo", "--config=configs/grpo_tiny.py",
         f"--workdir={tmp_path / 'run'}", "--config.grpo.rewards=(('nope_mod:f', 1.0),)"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "error: grpo.rewards: 'nope_mod:f': module 'nope_mod' does not import" in out.stderr
    assert not (tmp_path / "run").exists()  # refused before the workdir was made


def test_prompt_datasets_templates_and_a_resumable_stream(tmp_path):
    records = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    assert prompts.read_records(str(parquet), "prompt") == records
    stream = prompts.Prompts(str(jsonl), "prompt", seed=3)
    first_epoch = stream.next_batch(5)
    assert sorted(r["prompt"] for r in first_epoch) == [r["prompt"] for r in records]
    state = stream.get_state()
    ahead = stream.next_batch(7)
    again = prompts.Prompts(str(jsonl), "prompt", seed=3)
    again.set_state(state)
    assert again.next_batch(7) == ahead
    assert prompts.render("Q: {prompt} ({answer})", records[2], "prompt") == "Q: q2 (2)"
    assert prompts.render("r1_zero", records[2], "prompt").endswith("User: q2. Assistant:")
    with pytest.raises(ValueError, match="record 0 has no field 'question'"):
        prompts.read_records(str(jsonl), "question")


def test_the_built_in_task_is_single_digit_addition():
    stream = prompts.Prompts("add", "prompt", seed=0)
    batch = stream.next_batch(500)
    problems = {r["prompt"] for r in batch}
    assert len(problems) == 45  # every a + b <= 8, a, b >= 0
    for r in batch:
        a, b = r["prompt"].rstrip("=").split("+")
        assert r["answer"] == str(int(a) + int(b)) and int(r["answer"]) <= 8
    assert prompts.Prompts("add", "prompt", seed=0).next_batch(500) == batch
    assert np.mean([r == s for r, s in zip(batch, prompts.Prompts(
        "add", "prompt", seed=1).next_batch(500), strict=True)]) < 0.2
    # grpo_tiny is a valid GRPO config
    cfg = grpo_tiny.get_config()
    assert GRPOSpec.from_config(cfg, model_config(cfg)).prompts_per_batch == 16


def test_launch_plot_draws_a_grpo_run(tmp_path):
    from launch import plot

    rng = np.random.default_rng(0)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 6):
            record = {"step": step, "reward_mean": step / 10, "reward_std": 0.1,
                      "reward/exact_match": step / 10, "reward/format": 0.5,
                      "accuracy": step / 10, "kl": 0.01, "clip_fraction": 0.0,
                      "entropy": 5 - step / 2, "response_length": 4.0,
                      "rollout_tokens_per_sec": float(rng.uniform(1e3, 2e3)),
                      "rollout_time": 0.2, "update_time": 0.5}
            if step > 1:
                record["loss"] = 0.0
            f.write(json.dumps(record) + "\n")
        f.write(json.dumps({"step": 3, "event": "resumed"}) + "\n")
    written = plot.plot(str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["grpo.png"]
    assert os.path.getsize(written[0]) > 10_000


def write_tokenizer(path, text):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([text * 50], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path):
    """init_from's meta (here a trainer workdir's config.json) records its tokenizer; GRPO
    with another one would feed the model ids it never saw."""
    cfg = base.get_config()
    run = tmp_path / "sft"
    run.mkdir()
    hf = write_tokenizer(tmp_path / "a" / "tokenizer.json", "1+2=3 4+4=8 ")
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    shutil.copy(hf, copy)
    other = write_tokenizer(tmp_path / "b" / "tokenizer.json", "def f(x): return x ")

    def record(tokenizer):
        with open(run / "config.json", "w") as f:
            json.dump({"model": dataclasses.asdict(model_config(cfg)), "tokenizer": tokenizer},
                      f)

    record({"kind": "bytes"})
    assert spec_of(init_from=str(run)).group_size == 8
    with pytest.raises(ValueError, match=r"data.tokenizer=.*b/tokenizer.json' is not the "
                       r"tokenizer init_from=.* was trained with \('bytes'"):
        spec_of(init_from=str(run), tokenizer=other)
    record({"kind": "hf", "path": hf})
    with pytest.raises(ValueError, match=r"data.tokenizer='bytes' is not the tokenizer .*"
                       r"--config.data.tokenizer=.*a/tokenizer.json"):
        spec_of(init_from=str(run))
    with pytest.raises(ValueError, match=r"is not the tokenizer"):
        spec_of(init_from=str(run), tokenizer=other)
    assert spec_of(init_from=str(run), tokenizer=str(copy)).group_size == 8  # same contents
    record(None)  # trained on token ids: nothing to compare
    assert spec_of(init_from=str(run), tokenizer=other).group_size == 8


def test_a_failing_reward_is_reported_with_the_configured_prompt_field():
    def broken(record, completion):
        raise KeyError("answer")

    reports = []
    scored = rewards.score([rewards.Reward("broken", broken, 1.0)], [{"question": "2+2?"}],
                           ["4"], report=reports.append, prompt_field="question")
    assert scored.failures == 1 and len(reports) == 1
    assert "on question '2+2?', completion '4'" in reports[0], reports[0]


def test_the_readme_r1_zero_example_fits_its_seq_len(tmp_path):
    """README's second GRPO command: configs/grpo_tiny.py with R1-Zero's template (~400 byte
    tokens) needs its seq_len=512 override; at grpo_tiny's own seq_len=16 it is refused."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 12 + 30?", "answer": "42"}) + "\n")
    cfg = grpo_tiny.get_config()
    cfg.grpo.prompts, cfg.grpo.template = str(path), "r1_zero"
    with pytest.raises(ValueError, match=r"record 0 takes 4\d\d tokens with the template; "
                       r"seq_len - grpo.max_new_tokens leaves 12"):
        GRPOSpec.from_config(cfg, model_config(cfg))
    cfg.seq_len, cfg.batch_size, cfg.grpo.max_new_tokens = 512, 32, 64
    assert GRPOSpec.from_config(cfg, model_config(cfg)).prompts_per_batch == 4
