"""Generation on the tiny config: the latent cache is exact, batching does not change greedy
output, MTP speculative decoding equals plain greedy, sampling follows temperature and top-p,
bad requests are refused, and the CLI streams what the API returns.

The model is built, not trained: random weights (std 0.2, so logits are far from ties) whose
residual branches are scaled down to 0.003 and whose MTP projection passes the embedding
through. The main model is then close to a bigram model, and the MTP depth, which sees the next
token's embedding, mostly drafts what the main model will say next: 50-90% of drafts are
accepted, so both the accept and the reject paths of speculative decoding run.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.infer.generate import _COMPILED as COMPILED
from dsv3_jax.infer.generate import TextStream, generate, load_checkpoint, sample_logits
from dsv3_jax.tokenizer import ByteTokenizer
from dsv3_jax.train.checkpointer import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dsv3_jax.preset("tiny", init_std=0.2)
PROMPT_LENGTHS = (3, 8, 14)
MAX_NEW = 30
# One cache length for every call (and the CLI's), so the compiled programs are shared: the
# prefill for prompts padded to 16 tokens, the step for batches of 1 and 3.
L = 50


def near_bigram_variables(config, branch_scale: float, seed: int = 0):
    variables = dsv3_jax.init(config, jax.random.key(seed))

    def build(path, x):
        name = jax.tree_util.keystr(path)
        if name.endswith("['wo']") or name.endswith("['w_down']"):
            return x * branch_scale
        if name.endswith("['eh_proj']"):  # [embedding; hidden] -> embedding
            return jnp.concatenate([jnp.eye(config.dim), jnp.zeros((config.dim, config.dim))])
        return x

    return jax.tree_util.tree_map_with_path(build, variables)


@pytest.fixture(scope="module")
def variables():
    return near_bigram_variables(CONFIG, 0.003)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def eos(variables, prompts):
    """A token one sequence says after a few steps and another never says: as EOS it stops
    one sequence early while another runs to max_new_tokens."""
    free = generate(CONFIG, variables, prompts, max_new_tokens=MAX_NEW, cache_len=L).tokens
    return next(t for a in free for t in a[3:]
                if t not in a[:3] and any(t not in b for b in free))


@pytest.fixture(scope="module")
def greedy(variables, prompts, eos):
    return generate(CONFIG, variables, prompts, max_new_tokens=MAX_NEW, eos_id=eos, cache_len=L)


def test_greedy_equals_argmax_of_the_full_forward_pass(variables, prompts, greedy, eos):
    """Every generated token (and the EOS that stopped a sequence) is the argmax of the
    training-form forward pass over prompt + tokens so far: prefill and the absorbed decode over
    the latent cache are exact."""
    assert sorted(set(greedy.finish_reasons)) == ["eos", "length"], greedy.finish_reasons
    full = [p + o + ([eos] if r == "eos" else []) for p, o, r in
            zip(prompts, greedy.tokens, greedy.finish_reasons, strict=True)]
    T = max(map(len, full))
    batch = np.zeros((len(full), T), np.int32)
    for b, seq in enumerate(full):
        batch[b, :len(seq)] = seq  # right padding: causal attention never reads it
    argmax_bt = np.asarray(dsv3_jax.forward(CONFIG, variables, batch).logits).argmax(-1)
    for b, (prompt, seq) in enumerate(zip(prompts, full, strict=True)):
        predicted = argmax_bt[b, len(prompt) - 1:len(seq) - 1].tolist()
        assert predicted == seq[len(prompt):], b
    for o, r in zip(greedy.tokens, greedy.finish_reasons, strict=True):
        assert eos not in o and (r == "eos" or len(o) == MAX_NEW)


def test_batched_generation_equals_one_by_one(variables, prompts, greedy, eos):
    for b, prompt in enumerate(prompts):
        alone = generate(CONFIG, variables, [prompt], max_new_tokens=MAX_NEW, eos_id=eos,
                         cache_len=L)
        assert alone.tokens[0] == greedy.tokens[b], b
        assert alone.finish_reasons[0] == greedy.finish_reasons[b]


def test_speculative_decoding_equals_plain_greedy(variables, prompts, greedy, eos):
    spec = generate(CONFIG, variables, prompts, max_new_tokens=MAX_NEW, eos_id=eos,
                    speculative="mtp", cache_len=L)
    assert spec.tokens == greedy.tokens
    assert spec.finish_reasons == greedy.finish_reasons
    stats = spec.stats
    # Both paths ran: accepted drafts (two tokens a step) and rejected ones (rolled back).
    assert 0 < stats.accepted < stats.drafted, (stats.accepted, stats.drafted)
    assert stats.steps < greedy.stats.steps
    # Without EOS and with an odd budget, a two-token step can overshoot max_new_tokens.
    for max_new in (17, 18):
        spec = generate(CONFIG, variables, prompts, max_new_tokens=max_new, speculative="mtp",
                        cache_len=L)
        plain = generate(CONFIG, variables, prompts, max_new_tokens=max_new, cache_len=L)
        assert spec.tokens == plain.tokens and all(len(t) == max_new for t in spec.tokens)


def test_text_stream_holds_back_a_split_character():
    stream = TextStream(ByteTokenizer())
    e_acute = list("é".encode())  # two bytes, two tokens
    assert stream.push([ord("a"), e_acute[0]]) == "a"
    assert stream.push([e_acute[1], ord("b")]) == "éb"
    assert stream.push([0xFF]) == "" and stream.push([], final=True) == "\ufffd"


def test_sampling_follows_temperature_and_top_p():
    """Frequencies of 20000 draws match softmax(logits / T) cut to the top-p set."""
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    logits = jnp.asarray(np.tile(np.log(probs), (20000, 1)), jnp.float32)
    for temperature, top_p in ((1.0, 0.7), (0.5, 0.95), (2.0, 1.0)):
        expected = probs ** (1 / temperature)
        expected /= expected.sum()
        mass_before = np.cumsum(expected) - expected
        expected = np.where(mass_before < top_p, expected, 0)
        expected /= expected.sum()
        draws = np.asarray(sample_logits(logits, jax.random.key(0), jnp.float32(temperature),
                                         jnp.float32(top_p)))
        freq = np.bincount(draws, minlength=4) / len(draws)
        sigma = np.sqrt(expected * (1 - expected) / len(draws))
        assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (temperature, top_p, freq)
        assert np.all(freq[expected == 0] == 0)


def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(variables, prompts, greedy, eos):
    def sample(**kw):
        return generate(CONFIG, variables, prompts, max_new_tokens=MAX_NEW, temperature=1.0,
                        cache_len=L, **kw).tokens

    assert sample(seed=1) == sample(seed=1) != sample(seed=2)
    assert sample(top_p=1e-6, eos_id=eos) == greedy.tokens


def test_the_decode_step_is_compiled_once(variables, prompts):
    """From an empty table of compiled programs (as in a new process; the persistent XLA cache
    makes this cheap), a call compiles the prefill and the step once for all its tokens; later
    calls of the same shapes compile nothing."""
    COMPILED.clear()
    first = generate(CONFIG, variables, prompts, max_new_tokens=MAX_NEW, cache_len=L)
    assert first.stats.compiles == 2 and first.stats.steps == MAX_NEW - 1
    shorter = [p[:-1] for p in prompts]  # the same padded prompt length and cache
    again = generate(CONFIG, variables, shorter, max_new_tokens=MAX_NEW, cache_len=L)
    assert again.stats.compiles == 0 and again.stats.new_tokens == 3 * MAX_NEW


def test_bad_requests_are_refused(variables):
    too_long = [1] * (CONFIG.max_seq_len + 1)
    with pytest.raises(ValueError, match=r"prompt 1 has 513 tokens; this model's maximum "
                                         r"length \(max_seq_len\) is 512"):
        generate(CONFIG, variables, [[1, 2], too_long])
    with pytest.raises(ValueError, match=r"500 tokens\) \+ max_new_tokens=20 = 520 tokens "
                                         r"exceeds .* use max_new_tokens <= 12"):
        generate(CONFIG, variables, [[1] * 500], max_new_tokens=20)
    with pytest.raises(ValueError, match="speculative='mtp' verifies drafts against the greedy"):
        generate(CONFIG, variables, [[1]], temperature=0.7, speculative="mtp")
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        generate(CONFIG, variables, [[CONFIG.vocab_size]])
    with pytest.raises(ValueError, match="string prompts need a tokenizer"):
        generate(CONFIG, variables, ["hello"])
    with pytest.raises(ValueError, match="top_p=0 must lie in"):
        generate(CONFIG, variables, [[1]], temperature=1.0, top_p=0)


def save_workdir(workdir, config, variables):
    """A checkpoint in a trainer workdir's layout, with the byte-level tokenizer."""
    meta = {"model": dataclasses.asdict(config), "tokenizer": {"kind": "bytes"}}
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(meta))
    checkpoints = Checkpointer(str(workdir / "checkpoints"), keep=1, asynchronous=False)
    checkpoints.save(1, variables, {}, meta)
    checkpoints.close()
    return workdir


def cli(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "launch.generate", f"--checkpoint={workdir}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_streams_what_the_api_returns(tmp_path, variables):
    """The CLI's stdout is the prompt and the API's greedy text, and --speculative=mtp reports
    acceptance and agreement."""
    workdir = save_workdir(tmp_path / "run", CONFIG, variables)
    config, loaded, tokenizer = load_checkpoint(str(workdir / "checkpoints" / "1"))
    assert config == CONFIG and isinstance(tokenizer, ByteTokenizer)
    prompt = "Hi"  # with BOS 3 tokens: the prefill and step of the one-by-one test
    api = generate(config, loaded, [prompt], max_new_tokens=L - 3, tokenizer=tokenizer)

    run = cli(workdir, f"--prompt={prompt}", f"--max_new_tokens={L - 3}", "--speculative=mtp",
              "--timing_runs=1")
    assert run.returncode == 0, run.stderr
    assert run.stdout == prompt + api.texts[0] + "\n"
    assert "MTP acceptance" in run.stderr and "output identical to plain greedy: yes" in run.stderr
    assert "tokens/s" in run.stderr

    batch_file = tmp_path / "prompts.txt"
    # Three prompts, the longest 14 tokens with BOS: the sampling test's programs.
    batch_file.write_text("Hi\nHello\\tthere\nA long prompt\n")
    run = cli(workdir, f"--batch_file={batch_file}", f"--max_new_tokens={L - 14}",
              "--temperature=0.9", "--top_p=0.9")
    assert run.returncode == 0, run.stderr
    for line in ("[0] Hi", "[1] Hello\tthere", "[2] A long prompt"):
        assert run.stdout.count(line) == 1, line
    assert "sampled:" in run.stderr


def test_cli_refuses_bad_requests_before_printing_anything(tmp_path, variables):
    """Each refusal is one error line on stderr, in the flags' spelling, and nothing reaches
    stdout (the prompt is not echoed first), whether the flags alone are wrong or the request
    does not fit the model."""
    workdir = save_workdir(tmp_path / "run", CONFIG, variables)
    without_mtp = {c: {k: v for k, v in tree.items() if k != "mtp_0"}
                   for c, tree in variables.items()}
    no_mtp = save_workdir(tmp_path / "no_mtp", CONFIG.replace(mtp_depth=0), without_mtp)
    for directory, args, message in [
        (workdir, ["--speculative=mtp", "--temperature=0.8"],
         "error: --speculative=mtp verifies drafts against the greedy token, but "
         "--temperature=0.8 samples: use --temperature=0, or leave out --speculative"),
        (workdir, ["--top_p=0"], "error: --top_p=0.0 must lie in (0, 1]"),
        (workdir, ["--max_new_tokens=0"], "error: --max_new_tokens=0 must be at least 1"),
        (workdir, ["--temperature=-1"], "error: --temperature=-1.0 must be >= 0"),
        (workdir, ["--speculative=mtp", "--timing_runs=0"],
         "error: --timing_runs=0 must be at least 1"),
        (no_mtp, ["--speculative=mtp"], "error: --speculative=mtp drafts with the MTP module, "
                                        f"and {no_mtp} has none (mtp_depth=0)"),
        (workdir, ["--prompt=" + "x" * 600], "error: prompt 0 has 601 tokens"),
    ]:
        if not any(a.startswith("--prompt=") for a in args):
            args = ["--prompt=Hi", *args]
        run = cli(directory, *args)
        assert run.returncode == 2, (args, run.stderr)
        assert run.stdout == "", (args, run.stdout)
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), (args, run.stderr)
        assert "speculative=None" not in run.stderr
