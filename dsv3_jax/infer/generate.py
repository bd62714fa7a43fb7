"""Text generation over the latent KV cache: batched prompts, greedy or sampled (temperature,
top-p), and MTP speculative decoding.

Legend: B prompts, P padded prompt length, L cache rows, V vocab, D model dim.

How a call runs:
  1. Prompts are right-padded to [B, P] and prefilled with the expanded (training-form) MLA
     into an empty latent cache of L = longest prompt + max_new_tokens rows (576 values per token
     per layer at DeepSeek-V3 sizes); the first new token comes from the prefill logits.
  2. Every later token is one call of a jitted step: the absorbed MLA over the latent cache,
     then greedy or sampled selection (chosen at run time), all on the device. The step has
     fixed shapes ([B] tokens, the [.., B, L, R+Hr] cache), so it is compiled once per (config,
     B, L, plain or speculative) and reused for every token and every later call.
  3. The host reads the tokens of step i while step i+1 already runs, stops a sequence at EOS or
     max_new_tokens, and stops the loop when every sequence has stopped.

Speculative decoding (speculative="mtp", greedy only): the first MTP depth drafts token n+1 from
the main model's state at position n-1 and token n; one main decode step of two tokens
[t_n, draft] verifies it. If the main model's argmax at t_n equals the draft, both that token
and the argmax after the draft are accepted (two tokens for one main step); otherwise only the
argmax is kept and the cache length rolls back by one, so the rejected draft's row is
overwritten later. The MTP depth keeps its own latent cache, advanced the same way. Every
emitted token is the main model's argmax given the tokens before it, so the output is the plain
greedy output token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import checkpoints
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import api, implementations
from dsv3_jax.tokenizer import load_tokenizer

# Prompts are padded to a multiple of this many tokens, so prompts of nearby lengths share one
# compiled prefill.
PREFILL_BUCKET = 16

TokenCallback = Callable[[int, list[int], "str | None"], None]


@dataclasses.dataclass
class GenerationStats:
    """Counts and wall-clock times of one `generate` call (compilation not included)."""

    prompt_tokens: int  # all prompts together
    new_tokens: int  # all sequences together, EOS not counted
    prefill_s: float  # until the first new tokens were on the host
    decode_s: float  # the rest
    compile_s: float  # programs compiled by this call (0 when all were compiled before)
    compiles: int
    steps: int  # decode steps after the prefill
    drafted: int = 0  # speculative: drafts verified (one per running sequence per step)
    accepted: int = 0  # speculative: drafts equal to the main model's token

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of prefill + decode."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def summary(self) -> str:
        text = (f"{self.new_tokens} new tokens in {self.prefill_s + self.decode_s:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s (prefill of {self.prompt_tokens} prompt "
                f"tokens {1e3 * self.prefill_s:.0f} ms, {self.steps} decode steps "
                f"{1e3 * self.decode_s / max(self.steps, 1):.1f} ms each")
        if self.compiles:
            text += f"; {self.compile_s:.1f} s compiling not counted"
        text += ")"
        if self.drafted:
            text += (f"; MTP drafts accepted {self.accepted}/{self.drafted} = "
                     f"{100 * self.accepted / self.drafted:.1f}%")
        return text


@dataclasses.dataclass
class Generation:
    """tokens: the new tokens of each prompt (EOS excluded); finish_reasons: "eos" or "length"
    per prompt; texts: the decoded new tokens when a tokenizer was given; logprobs: below."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None
    stats: GenerationStats
    # Per prompt, log p(token) of each new token under the policy that chose it (natural log):
    # log softmax(logits / temperature), before the top-p cut (the greedy policy's logits at
    # temperature 1), with the EOS that stopped a sequence included: len(tokens[i]) + 1 entries
    # when finish_reasons[i] is "eos". A training forward pass over prompt + tokens gives the
    # same values (tests/test_grpo_sampling.py).
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)


def generate(config: ModelConfig, variables: api.Variables,
             prompts: Sequence[str] | Sequence[Sequence[int]] | str, *,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, speculative: str | None = None, tokenizer: Any = None,
             eos_id: int | None = None, cache_len: int | None = None,
             on_tokens: TokenCallback | None = None) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt.

    prompts: strings (encoded with `tokenizer`, BOS first as in training documents) or lists of
      token ids (used as given). Prompts may differ in length; they run as one batch.
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature),
      restricted to the smallest set of tokens whose probability reaches `top_p`.
    seed: the sampling key. A batch draws one key per step for all rows, so a sampled sequence
      depends on the batch it ran in; greedy output does not.
    speculative: None, or "mtp": the MTP module drafts one token per step and the main model
      verifies it (greedy only: the output equals plain greedy decoding token for token).
    tokenizer: a dsv3_jax.tokenizer (ByteTokenizer, HFTokenizer): needed for string prompts;
      gives `texts` and the default `eos_id`.
    eos_id: a sequence stops after this token (not included in the output); None never stops
      early.
    cache_len: rows of the latent cache (default: longest prompt + max_new_tokens). Calls with
      the same batch size and cache_len reuse one compiled decode step.
    on_tokens: called as on_tokens(index, new_token_ids, finish_reason) whenever prompt `index`
      gets new tokens or stops (finish_reason "eos" / "length", else None): for streaming.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if eos_id is None and tokenizer is not None:
        eos_id = tokenizer.eos_id
    _check_settings(config, max_new_tokens, temperature, top_p, speculative, variables)
    prompt_ids = _encode_prompts(config, prompts, tokenizer)
    lengths = [len(p) for p in prompt_ids]
    L = _cache_rows(config, max(lengths), max_new_tokens, cache_len, lengths)
    # The implementations chosen once for the default backend; the programs trace this config.
    programs = _programs(implementations.resolved(config, jax.default_backend()),
                         speculative == "mtp")
    start_args = _start_args(config, variables, prompt_ids, L, speculative == "mtp", {
        "greedy": jnp.bool_(temperature == 0),
        "eos": jnp.int32(-1 if eos_id is None else eos_id),
        "max_new": jnp.int32(max_new_tokens),
        "temperature": jnp.float32(max(temperature, 1e-6)),
        "top_p": jnp.float32(top_p),
        "key": jax.random.key(seed),
    })
    compiled_before = len(_COMPILED)
    t0 = time.perf_counter()
    start = _compiled(programs.start, start_args)
    caches_shape, state_shape, _ = jax.eval_shape(programs.start, *start_args)
    step = _compiled(programs.step, (variables, caches_shape, state_shape))
    compile_s = time.perf_counter() - t0

    run = _Collected(len(prompt_ids), max_new_tokens, eos_id, on_tokens)
    prefill_s, decode_s = _decode_loop(start, step, start_args, run, bool(speculative))
    stats = GenerationStats(
        prompt_tokens=sum(lengths), new_tokens=sum(len(o) for o in run.tokens),
        prefill_s=prefill_s, decode_s=decode_s, compile_s=compile_s,
        compiles=len(_COMPILED) - compiled_before, steps=run.steps, drafted=run.drafted,
        accepted=run.accepted)
    texts = [tokenizer.decode(o) for o in run.tokens] if tokenizer is not None else None
    return Generation(run.tokens, run.reasons, texts, stats, run.logprobs)


class _Collected:
    """The host side of the loop: each sequence's new tokens and their log-probabilities as the
    device emits them, stopped at EOS or max_new_tokens; the step and draft counts."""

    def __init__(self, B: int, max_new_tokens: int, eos_id: int | None,
                 on_tokens: TokenCallback | None):
        self.max_new_tokens, self.eos_id, self.on_tokens = max_new_tokens, eos_id, on_tokens
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.logprobs: list[list[float]] = [[] for _ in range(B)]
        self.reasons: list[str | None] = [None] * B
        self.steps = self.drafted = self.accepted = 0
        self.calls = 0

    def all_stopped(self) -> bool:
        return all(r is not None for r in self.reasons)

    def add(self, outputs, count_drafts: bool) -> None:
        """One program's outputs (emitted [B, K], logprobs [B, K], counts [B], done [B])."""
        emitted_bk, logprobs_bk, counts_b, _ = outputs
        if self.calls:
            self.steps += 1
        self.calls += 1
        if count_drafts:
            running_b = counts_b > 0
            self.drafted += int(running_b.sum())
            self.accepted += int((counts_b[running_b] - 1).sum())
        for b, reason in enumerate(self.reasons):
            if reason is not None:
                continue
            new = []
            for tok, logp in zip(emitted_bk[b, :counts_b[b]].tolist(),
                                 logprobs_bk[b, :counts_b[b]].tolist(), strict=True):
                self.logprobs[b].append(logp)  # the stopping EOS's too
                if tok == self.eos_id:
                    self.reasons[b] = "eos"
                    break
                new.append(tok)
                if len(self.tokens[b]) + len(new) == self.max_new_tokens:
                    self.reasons[b] = "length"
                    break
            self.tokens[b].extend(new)
            if self.on_tokens is not None and (new or self.reasons[b] is not None):
                self.on_tokens(b, new, self.reasons[b])


def _start_args(config, variables, prompt_ids, L: int, speculative: bool, settings):
    """(variables, tokens [B, P], lengths [B], empty caches, settings): the prompts right-padded
    to a multiple of PREFILL_BUCKET (at most L)."""
    lengths = [len(p) for p in prompt_ids]
    B, P = len(prompt_ids), min(-(-max(lengths) // PREFILL_BUCKET) * PREFILL_BUCKET, L)
    tokens_bp = np.zeros((B, P), np.int32)
    for b, ids in enumerate(prompt_ids):
        tokens_bp[b, :len(ids)] = ids
    caches = {"main": api.init_cache(config, B, L)}
    if speculative:
        caches["mtp"] = api.init_mtp_cache(config, B, L)
    return (variables, jnp.asarray(tokens_bp), jnp.asarray(lengths, jnp.int32), caches,
            settings)


def _decode_loop(start, step, start_args, run: _Collected, speculative: bool):
    """Run the prefill and then decode steps until every sequence stopped; (prefill_s,
    decode_s)."""
    variables = start_args[0]
    t0 = time.perf_counter()
    caches, state, pending = start(*start_args)
    prefill_s = None
    for i in range(run.max_new_tokens):
        # Queue the next step before reading this one's tokens, so the device does not wait
        # for the host (the last one queued may go unused).
        nxt = None
        if i < run.max_new_tokens - 1:
            caches, state, nxt = step(variables, caches, state)
        run.add(jax.device_get(pending), count_drafts=speculative and prefill_s is not None)
        if prefill_s is None:
            prefill_s = time.perf_counter() - t0
        if run.all_stopped() or nxt is None:
            break
        pending = nxt
    # Every step adds at least one token to each running sequence, so max_new_tokens rounds
    # stop them all.
    assert run.all_stopped(), run.reasons
    return prefill_s, time.perf_counter() - t0 - prefill_s


class TextStream:
    """Token ids -> text as they arrive (for streaming): `push` returns the new text, holding
    back a trailing incomplete character (a multi-byte character split across tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        end = len(text) if final else len(text.rstrip("\ufffd"))
        new, self.shown = text[self.shown:end], max(self.shown, end)
        return new


# Checks -----------------------------------------------------------------------------------------

def _check_settings(config, max_new_tokens, temperature, top_p, speculative, variables):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must lie in (0, 1] (1 = no nucleus cut)")
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative={speculative!r} is not one of None, 'mtp'")
    if speculative == "mtp":
        if temperature != 0:
            raise ValueError(
                f"speculative='mtp' verifies drafts against the greedy token; temperature="
                f"{temperature} samples. Use temperature=0, or speculative=None to sample")
        if not config.mtp_depth or "mtp_0" not in variables["params"]:
            raise ValueError("speculative='mtp' needs an MTP module; this model has mtp_depth="
                             f"{config.mtp_depth}")


def _encode_prompts(config: ModelConfig, prompts, tokenizer) -> list[list[int]]:
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    ids = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer (tokenizer=...); or pass lists "
                                 "of token ids")
            toks = tokenizer.encode(prompt)
            if tokenizer.bos_id is not None:
                toks = [tokenizer.bos_id, *toks]
        else:
            toks = [int(t) for t in prompt]
        if not toks:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in toks if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]}, outside this model's vocabulary "
                             f"[0, {config.vocab_size})")
        if len(toks) > config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(toks)} tokens; this model's maximum length "
                             f"(max_seq_len) is {config.max_seq_len} tokens")
        ids.append(toks)
    return ids


def _cache_rows(config, longest, max_new_tokens, cache_len, lengths) -> int:
    need = longest + max_new_tokens
    if need > config.max_seq_len:
        i = lengths.index(longest)
        raise ValueError(
            f"prompt {i} ({longest} tokens) + max_new_tokens={max_new_tokens} = {need} tokens "
            f"exceeds this model's maximum length (max_seq_len) {config.max_seq_len}; use "
            f"max_new_tokens <= {config.max_seq_len - longest}")
    if cache_len is None:
        return need
    if not need <= cache_len <= config.max_seq_len:
        raise ValueError(f"cache_len={cache_len} must lie in [{need}, {config.max_seq_len}]: the "
                         f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}), at "
                         "most max_seq_len")
    return cache_len


# Device programs --------------------------------------------------------------------------------

def sample_logits(logits_bv: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Sample one token per row of logits [B, V] -> [B] int32: softmax(logits / temperature),
    keeping only the smallest set of most probable tokens whose total probability reaches
    top_p (ties at the cut are kept)."""
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    # The top token is always kept (mass_before = 0 < top_p).
    cutoff_b = jnp.min(jnp.where(mass_before_bv < top_p, sorted_bv, jnp.inf), axis=-1)
    cutoff_b = jnp.where(top_p >= 1, -jnp.inf, cutoff_b)  # no cut from rounding at top_p = 1
    logits_bv = jnp.where(logits_bv >= cutoff_b[:, None], logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def token_logprobs(logits_bv: jax.Array, tokens_b: jax.Array, temperature: jax.Array
                   ) -> jax.Array:
    """log softmax(logits / temperature)[token] per row, fp32 [B]: the log-probability a
    sampling policy at `temperature` gives the chosen token (before any top-p cut)."""
    logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _Programs:
    # (variables, tokens_bp, lengths_b, caches, settings) -> (caches, state, outputs)
    start: Callable
    # (variables, caches, state) -> (caches, state, outputs); outputs are (emitted [B, K],
    # their log-probabilities [B, K], counts [B]: how many of the K are new, done [B])
    step: Callable


@functools.lru_cache(maxsize=16)
def _programs(config: ModelConfig, speculative: bool) -> _Programs:
    step = _speculative_step(config) if speculative else _plain_step(config)
    return _Programs(start=jax.jit(_start(config, speculative), donate_argnums=3),
                     step=jax.jit(step, donate_argnums=1))


def _choose(logits_bv: jax.Array, state: dict) -> tuple[jax.Array, jax.Array]:
    """(token [B], its log-probability [B]): greedy or sampled, chosen at run time, so one
    program serves both. The greedy policy's log-probabilities are at temperature 1."""
    def sample():
        key = jax.random.fold_in(state["key"], state["step"])
        return sample_logits(logits_bv, key, state["temperature"], state["top_p"])

    token_b = jax.lax.cond(state["greedy"],
                           lambda: jnp.argmax(logits_bv, axis=-1).astype(jnp.int32), sample)
    temperature = jnp.where(state["greedy"], jnp.float32(1), state["temperature"])
    return token_b, token_logprobs(logits_bv, token_b, temperature)


def _start(config: ModelConfig, speculative: bool) -> Callable:
    def start(variables, tokens_bp, lengths_b, caches, settings):
        B, P = tokens_bp.shape
        rows_b = jnp.arange(B)
        state = {**settings, "step": jnp.int32(0)}
        logits_bpv, cache, h_bpd = api.prefill(config, variables, tokens_bp, lengths_b,
                                               caches["main"], return_hidden=True)
        first_b, logp_b = _choose(logits_bpv[rows_b, lengths_b - 1], state)
        ones_b = jnp.ones((B,), jnp.int32)
        done_b = (first_b == state["eos"]) | (ones_b >= state["max_new"])
        state = {**state, "last": first_b, "done": done_b, "generated": ones_b,
                 "step": jnp.int32(1)}
        new_caches = {"main": cache}
        if speculative:
            # MTP position i reads (h_i, t_{i+1}): the prompt shifted left, then the first
            # new token at the last prompt position, whose logits draft t_{P+1}.
            next_bp = jnp.concatenate([tokens_bp[:, 1:], tokens_bp[:, :1]], axis=1)
            next_bp = jnp.where(jnp.arange(P)[None, :] == (lengths_b - 1)[:, None],
                                first_b[:, None], next_bp)
            mtp_logits_bpv, _, mtp_cache = api.mtp_step(config, variables, h_bpd, next_bp,
                                                        caches["mtp"], prefill=True)
            state["draft"] = jnp.argmax(mtp_logits_bpv[rows_b, lengths_b - 1],
                                        axis=-1).astype(jnp.int32)
            new_caches["mtp"] = mtp_cache.replace(lengths=lengths_b)
        return new_caches, state, (first_b[:, None], logp_b[:, None], ones_b, done_b)

    return start


def _plain_step(config: ModelConfig) -> Callable:
    def plain_step(variables, caches, state):
        done_b = state["done"]
        logits_b1v, cache = api.decode(config, variables, state["last"][:, None],
                                       caches["main"])
        token_b, logp_b = _choose(logits_b1v[:, 0], state)
        counts_b = (~done_b).astype(jnp.int32)
        generated_b = state["generated"] + counts_b
        # A stopped sequence keeps decoding (its tokens are dropped): at most max_new_tokens - 1
        # steps follow the prefill, so its rows stay inside the cache.
        done_b = done_b | (token_b == state["eos"]) | (generated_b >= state["max_new"])
        state = {**state, "last": token_b, "done": done_b, "generated": generated_b,
                 "step": state["step"] + 1}
        return {"main": cache}, state, (token_b[:, None], logp_b[:, None], counts_b, done_b)

    return plain_step


def _speculative_step(config: ModelConfig) -> Callable:
    def speculative_step(variables, caches, state):
        done_b = state["done"]
        n_b = caches["main"].lengths  # tokens in the cache; state["last"] is token n
        B, L = n_b.shape[0], caches["mtp"].kv["mtp_0"].shape[1]
        rows_b = jnp.arange(B)
        tokens_b2 = jnp.stack([state["last"], state["draft"]], axis=1)
        logits_b2v, cache, h_b2d = api.decode(config, variables, tokens_b2, caches["main"],
                                              return_hidden=True)
        argmax_b2 = jnp.argmax(logits_b2v, axis=-1).astype(jnp.int32)
        logp_b2 = jax.vmap(token_logprobs, in_axes=(1, 1, None), out_axes=1)(
            logits_b2v, argmax_b2, jnp.float32(1))
        accept_b = argmax_b2[:, 0] == state["draft"]
        # MTP positions n, n+1 read (h_n, t_{n+1}) and (h_{n+1}, t_{n+2}); the second is only
        # meaningful when the draft was accepted, and is rolled back otherwise.
        mtp_logits_b2v, _, mtp_cache = api.mtp_step(config, variables, h_b2d, argmax_b2,
                                                    caches["mtp"], prefill=False)
        draft_b = jnp.argmax(mtp_logits_b2v[rows_b, accept_b.astype(jnp.int32)],
                             axis=-1).astype(jnp.int32)
        counts_b = jnp.where(done_b, 0, 1 + accept_b.astype(jnp.int32))
        generated_b = state["generated"] + counts_b
        eos_b = (argmax_b2[:, 0] == state["eos"]) | (
            accept_b & (argmax_b2[:, 1] == state["eos"]))
        new_done_b = done_b | ((counts_b > 0) & eos_b) | (generated_b >= state["max_new"])
        # Rejected drafts roll back (their rows are overwritten later). A stopped sequence
        # keeps decoding with its output dropped; its length is held where its writes stay in
        # its own rows.
        lengths_b = n_b + counts_b
        lengths_b = jnp.where(new_done_b, jnp.minimum(lengths_b, L - 2), lengths_b)
        caches = {"main": cache.replace(lengths=lengths_b),
                  "mtp": mtp_cache.replace(lengths=lengths_b)}
        state = {**state, "last": jnp.where(accept_b, argmax_b2[:, 1], argmax_b2[:, 0]),
                 "draft": draft_b, "done": new_done_b, "generated": generated_b,
                 "step": state["step"] + 1}
        return caches, state, (argmax_b2, logp_b2, counts_b, new_done_b)

    return speculative_step


_COMPILED: dict = {}


def _compiled(fn, args):
    """The compiled executable of jitted `fn` for these argument shapes, compiled once (ahead of
    time, so the timed loop runs no compiler)."""
    leaves, treedef = jax.tree.flatten(args)
    signature = tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None))
                      for x in leaves)
    key = (fn, treedef, signature)
    if key not in _COMPILED:
        _COMPILED[key] = fn.lower(*args).compile()
    return _COMPILED[key]


# Checkpoints ------------------------------------------------------------------------------------

def load_checkpoint(path: str, tokenizer: str | None = None
                    ) -> tuple[ModelConfig, api.Variables, Any]:
    """(config, variables, tokenizer) from a trainer workdir (its latest step), its checkpoints
    directory, one step directory, or a directory written by `launch.convert hf-to-orbax`. The
    model config and tokenizer come from the step's meta, else the run's config.json;
    `tokenizer` ('bytes' or a tokenizer.json path) overrides the recorded one. The tokenizer is
    None when the run recorded none (token-id data)."""
    meta, meta_dir = checkpoints.read_meta(path)
    config = checkpoints.model_config(meta, meta_dir)
    variables, _ = checkpoints.load_variables(path, api.abstract_variables(config))
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = checkpoints.recorded_tokenizer(meta.get("tokenizer"), meta_dir)
    return config, variables, tok
