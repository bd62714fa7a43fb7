"""Prompts: the built-in verifiable task, or a .jsonl / .parquet dataset of records; a prompt
template; and a resumable iterator over them.

A record is a dict with a prompt field (default "prompt") and whatever its rewards read (the
built-in `exact_match` reads "answer"). The built-in task, `add`, is single-digit addition with
a single-digit sum, "3+4=" -> "7" (45 problems drawn at random): small enough that `tiny` learns
it from random weights by RL alone on a CPU in minutes, and verifiable by exact match.

The iterator's state is one number, the records handed out so far: record n is the n-th draw of
a generator seeded by (seed, n) for the built-in task, and position n mod N of the permutation
seeded by (seed, n // N) for a dataset of N records (a new order every epoch). Restoring the
number restores the stream exactly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

BUILT_IN_TASKS = ("add",)
TEMPLATES = {
    "plain": "{prompt}",
    # DeepSeek-R1 table 1 (R1-Zero's template).
    "r1_zero": ("A conversation between User and Assistant. The user asks a question, and the "
                "Assistant solves it. The assistant first thinks about the reasoning process in "
                "the mind and then provides the user with the answer. The reasoning process and "
                "answer are enclosed within <think> </think> and <answer> </answer> tags, "
                "respectively, i.e., <think> reasoning process here </think> <answer> answer "
                "here </answer>. User: {prompt}. Assistant:"),
}


def add_problem(rng: np.random.Generator) -> dict[str, Any]:
    a = int(rng.integers(0, 9))
    b = int(rng.integers(0, 9 - a))
    return {"prompt": f"{a}+{b}=", "answer": str(a + b)}


def template_text(template: str) -> str:
    """A template name or a format string; ValueError when it is neither."""
    text = TEMPLATES.get(template, template)
    if "{" not in text:
        raise ValueError(f"grpo.template={template!r} is neither a template name "
                         f"({', '.join(TEMPLATES)}) nor a format string with a field such as "
                         "'{prompt}'")
    return text


def render(template: str, record: dict, prompt_field: str) -> str:
    """The prompt text of a record: the template filled with its fields ({prompt} is the
    record's prompt field)."""
    return template_text(template).format_map({**record, "prompt": record[prompt_field]})


class Prompts:
    """The prompt stream of a run (`source`: a built-in task name or a dataset path)."""

    def __init__(self, source: str, prompt_field: str, seed: int):
        self.source, self.prompt_field, self.seed = source, prompt_field, seed
        self.records = None if source in BUILT_IN_TASKS else read_records(source, prompt_field)
        self.index = 0

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        batch = [self._record(self.index + i) for i in range(n)]
        self.index += n
        return batch

    def _record(self, n: int) -> dict[str, Any]:
        if self.records is None:
            return add_problem(np.random.default_rng([self.seed, n]))
        N = len(self.records)
        order = np.random.default_rng([self.seed, n // N]).permutation(N)
        return self.records[int(order[n % N])]

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


def read_records(path: str, prompt_field: str) -> list[dict[str, Any]]:
    """The records of a .jsonl or .parquet file; ValueError for a missing file, another format,
    bad JSON, no records, or a record without the prompt field."""
    if not os.path.isfile(path):
        raise ValueError(f"grpo.prompts={path!r}: no such file; give a .jsonl or .parquet file, "
                         f"or a built-in task ({', '.join(BUILT_IN_TASKS)})")
    if path.endswith(".jsonl"):
        records = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no} is not valid JSON ({e})") from None
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"grpo.prompts={path!r}: expected a .jsonl or .parquet file")
    if not records:
        raise ValueError(f"grpo.prompts={path!r} holds no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or prompt_field not in record:
            raise ValueError(f"{path}: record {i} has no field {prompt_field!r} "
                             f"(grpo.prompt_field); its fields: "
                             f"{sorted(record) if isinstance(record, dict) else record!r}")
    return records
