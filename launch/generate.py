"""Generate text from a checkpoint: prefill with the training-form MLA, then decode with the
absorbed form over the latent cache, streaming tokens as they come.

  python -m launch.generate --checkpoint=runs/tiny --prompt='def main(' --max_new_tokens=200
  python -m launch.generate --checkpoint=runs/tiny --prompt='import ' --temperature=0.8 --top_p=0.95
  python -m launch.generate --checkpoint=runs/tiny --batch_file=prompts.txt   # a prompt a line
  python -m launch.generate --checkpoint=runs/tiny --prompt='class ' --speculative=mtp

--checkpoint is a trainer workdir (or its checkpoints/ or one step directory) or a directory
written by launch.convert. Prompts understand the escapes \\n and \\t. One prompt streams token by
token; a batch prints each sequence when it stops (EOS or --max_new_tokens). Generated text goes
to stdout, statistics to stderr. --speculative=mtp (greedy only) drafts with the MTP module and
verifies with the main model, then times it against plain greedy decoding (--timing_runs
unstreamed runs of each) and prints the acceptance rate, the speed-up, and whether the outputs
are identical.
"""

from __future__ import annotations

import codecs
import sys

from absl import app, flags
from absl import logging as absl_logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Trainer workdir or checkpoint directory.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (\\n and \\t are understood).")
_BATCH_FILE = flags.DEFINE_string("batch_file", None, "A file of prompts, one per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most probable tokens up "
                            "to this total probability.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_enum("speculative", "", ["", "mtp"],
                                 "'mtp': MTP drafts, the main model verifies (greedy only).")
_TIMING_RUNS = flags.DEFINE_integer("timing_runs", 3, "With --speculative: time speculative and "
                                    "plain greedy decoding this many times each (unstreamed, "
                                    "alternating) and compare the medians.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Override the checkpoint's tokenizer: "
                                 "'bytes' or a tokenizer.json path.")
flags.mark_flag_as_required("checkpoint")


def unescape(prompt: str) -> str:
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def read_prompts() -> list[str]:
    if (_PROMPT.value is None) == (_BATCH_FILE.value is None):
        raise ValueError("give exactly one of --prompt and --batch_file")
    if _PROMPT.value is not None:
        return [unescape(_PROMPT.value)]
    with codecs.open(_BATCH_FILE.value, encoding="utf-8") as f:
        prompts = [unescape(line.rstrip("\r\n")) for line in f]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"--batch_file {_BATCH_FILE.value!r} holds no prompts")
    return prompts


def check_flags() -> None:
    """Refuse impossible flag values, in the flags' spelling, before anything is loaded."""
    if _MAX_NEW.value < 1:
        raise ValueError(f"--max_new_tokens={_MAX_NEW.value} must be at least 1")
    if not _TEMPERATURE.value >= 0:
        raise ValueError(f"--temperature={_TEMPERATURE.value} must be >= 0 (0 = greedy)")
    if not 0 < _TOP_P.value <= 1:
        raise ValueError(f"--top_p={_TOP_P.value} must lie in (0, 1] (1 = no nucleus cut)")
    if _TIMING_RUNS.value < 1:
        raise ValueError(f"--timing_runs={_TIMING_RUNS.value} must be at least 1")
    if _SPECULATIVE.value == "mtp" and _TEMPERATURE.value != 0:
        raise ValueError(
            "--speculative=mtp verifies drafts against the greedy token, but --temperature="
            f"{_TEMPERATURE.value} samples: use --temperature=0, or leave out --speculative to "
            "sample")


def run() -> None:
    check_flags()
    prompts = read_prompts()
    import jax

    from dsv3_jax.infer.generate import TextStream, generate, load_checkpoint
    from dsv3_jax.model import implementations

    config, variables, tokenizer = load_checkpoint(_CHECKPOINT.value, _TOKENIZER.value)
    if tokenizer is None:
        raise ValueError(f"{_CHECKPOINT.value} records no tokenizer (a run on token ids, or a "
                         "conversion without tokenizer files); pass --tokenizer=bytes (the "
                         "byte-level one) or --tokenizer=PATH/tokenizer.json")
    if _SPECULATIVE.value == "mtp" and not config.mtp_depth:
        raise ValueError(f"--speculative=mtp drafts with the MTP module, and {_CHECKPOINT.value} "
                         "has none (mtp_depth=0); leave out --speculative")
    kernels = implementations.resolve(config, jax.default_backend())
    print(f"kernels on {jax.default_backend()}: {kernels.describe()}", file=sys.stderr)
    streams = [TextStream(tokenizer) for _ in prompts]
    single = len(prompts) == 1
    echoed = False

    def on_tokens(index: int, ids: list[int], finish: str | None) -> None:
        # The prompt is echoed with the first tokens, once generate() has accepted the request,
        # so that a refusal (a prompt too long for the model, ...) is never printed after it.
        nonlocal echoed
        text = streams[index].push(ids, final=finish is not None)
        if single:
            if not echoed:
                sys.stdout.write(prompts[0])
                echoed = True
            sys.stdout.write(text + ("\n" if finish else ""))
        elif finish:
            completion = tokenizer.decode(streams[index].ids)
            sys.stdout.write(f"[{index}] {prompts[index]}{completion}\n\n")
        sys.stdout.flush()

    speculative = _SPECULATIVE.value or None
    result = generate(config, variables, prompts, max_new_tokens=_MAX_NEW.value,
                      temperature=_TEMPERATURE.value, top_p=_TOP_P.value, seed=_SEED.value,
                      speculative=speculative, tokenizer=tokenizer, on_tokens=on_tokens)
    stats = result.stats
    label = "speculative (MTP) greedy" if speculative else (
        "greedy" if _TEMPERATURE.value == 0 else "sampled")
    print(f"{label}: {stats.summary()}", file=sys.stderr)
    if speculative:
        compare(config, variables, prompts, tokenizer, result)


def compare(config, variables, prompts, tokenizer, streamed) -> None:
    """Time speculative against plain greedy decoding (medians of unstreamed runs) and check
    that both give the streamed output."""
    import numpy as np

    from dsv3_jax.infer.generate import generate

    rates: dict[str | None, list[float]] = {"mtp": [], None: []}
    same = True
    for _ in range(_TIMING_RUNS.value):
        for mode in (None, "mtp"):
            run = generate(config, variables, prompts, max_new_tokens=_MAX_NEW.value,
                           speculative=mode, tokenizer=tokenizer)
            rates[mode].append(run.stats.tokens_per_s)
            same &= run.tokens == streamed.tokens
    spec, plain = float(np.median(rates["mtp"])), float(np.median(rates[None]))
    stats = streamed.stats
    print(f"MTP acceptance {100 * (stats.acceptance_rate or 0):.1f}% ({stats.accepted}/"
          f"{stats.drafted} drafts: {1 + (stats.acceptance_rate or 0):.2f} tokens per main-model "
          f"step); speed-up over plain greedy {spec / plain:.2f}x ({spec:.1f} vs "
          f"{plain:.1f} tokens/s, medians of {len(rates[None])} runs); output identical to plain "
          f"greedy: {'yes' if same else 'NO'}", file=sys.stderr)
    if not same:
        raise RuntimeError("speculative output differs from plain greedy decoding")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    try:
        run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
