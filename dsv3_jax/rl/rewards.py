"""Rewards: Python callables `reward(record, completion) -> float`, named in the config as
`module:function` or by a built-in name, each with a weight; a sample's reward is the weighted
sum. A reward function that raises, or returns something that is not a finite number, does not
stop the run: the sample is reported (its prompt, completion and the error), counted, and gets
a non-finite total, so it has no advantage and no loss tokens (`loss.group_advantages`).

Built-ins:
  exact_match     1 if the final answer equals record["answer"], else 0. The final answer is
                  the text inside the last <answer>...</answer>, else the last number in the
                  completion, else the whole completion stripped (compared as text, numbers
                  normalized: "07" == "7").
  format          1 if the completion has the R1-Zero form <think>...</think><answer>...</answer>
                  (whitespace around and between allowed), else 0.
  length_penalty  -(completion characters / max_new_tokens), at most 1 in size: with a weight,
                  a cost per character (tokens are characters under the byte tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("dsv3_jax.rl")

RewardFn = Callable[[dict, str], float]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def final_answer(completion: str) -> str:
    """The answer a completion gives (exact_match's rule, above)."""
    tagged = _ANSWER.findall(completion)
    if tagged:
        return _normalize(tagged[-1].strip())
    numbers = _NUMBER.findall(completion)
    return _normalize(numbers[-1]) if numbers else completion.strip()


def _normalize(text: str) -> str:
    if _NUMBER.fullmatch(text):
        value = float(text)
        return str(int(value)) if value == int(value) else str(value)
    return text


def exact_match(record: dict, completion: str) -> float:
    return float(final_answer(completion) == _normalize(str(record["answer"]).strip()))


def format_reward(record: dict, completion: str) -> float:
    del record
    return float(_FORMAT.fullmatch(completion) is not None)


def length_penalty(record: dict, completion: str, *, max_new_tokens: int) -> float:
    del record
    return -min(1.0, len(completion) / max_new_tokens)


BUILT_IN: dict[str, Callable[..., float]] = {
    "exact_match": exact_match, "format": format_reward, "length_penalty": length_penalty}


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str  # as configured: a built-in name or module:function
    fn: RewardFn
    weight: float


def resolve(rewards: Sequence[Sequence[Any]], max_new_tokens: int) -> tuple[Reward, ...]:
    """The configured ((name or module:function, weight), ...) as callables; ValueError naming
    the entry that is malformed or does not import."""
    if not rewards:
        raise ValueError("grpo.rewards is empty; give at least one (name, weight), e.g. "
                         "(('exact_match', 1.0),)")
    out = []
    for entry in rewards:
        if not (isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2
                and isinstance(entry[0], str) and isinstance(entry[1], (int, float))):
            raise ValueError(f"grpo.rewards entry {entry!r} is not a (name, weight) pair such "
                             "as ('exact_match', 1.0) or ('my_module:my_reward', 0.5)")
        name, weight = entry
        out.append(Reward(name, _callable(name, max_new_tokens), float(weight)))
    return tuple(out)


def _callable(name: str, max_new_tokens: int) -> RewardFn:
    if name == "length_penalty":
        return functools.partial(length_penalty, max_new_tokens=max_new_tokens)
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise ValueError(f"grpo.rewards: {name!r} is neither a built-in reward "
                         f"({', '.join(BUILT_IN)}) nor a 'module:function' path")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"grpo.rewards: {name!r}: module {module_name!r} does not import "
                         f"({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"grpo.rewards: {name!r}: module {module_name!r} has no callable "
                         f"{attr!r}")
    return fn


@dataclasses.dataclass
class Scored:
    """Rewards of a batch: totals [B] (NaN where a reward failed), per reward function the
    values [B] (NaN where it failed), and how many samples failed."""

    totals: list[float]
    per_reward: dict[str, list[float]]
    failures: int


def score(rewards: Sequence[Reward], records: Sequence[dict], completions: Sequence[str],
          report: Callable[[str], None] = log.warning, prompt_field: str = "prompt") -> Scored:
    """Every reward of every (record, completion) pair; a failure is reported (with the
    record's `prompt_field`), never raised."""
    per_reward = {r.name: [] for r in rewards}
    totals, failures = [], 0
    for record, completion in zip(records, completions, strict=True):
        total, failed = 0.0, False
        for r in rewards:
            value, error = _call(r.fn, record, completion)
            if error is not None:
                failed = True
                report(f"reward {r.name} failed ({error}) on {prompt_field} "
                       f"{record.get(prompt_field)!r}, completion {completion!r}; the sample "
                       "gets no advantage")
                value = math.nan
            per_reward[r.name].append(value)
            total += r.weight * value
        failures += failed
        totals.append(math.nan if failed else total)
    return Scored(totals, per_reward, failures)


def _call(fn: RewardFn, record: dict, completion: str) -> tuple[float, str | None]:
    try:
        value = fn(record, completion)
    except Exception as e:
        return math.nan, f"{type(e).__name__}: {e}"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan, f"returned {value!r}, not a number"
    if not math.isfinite(value):
        return math.nan, f"returned {value}"
    return value, None
