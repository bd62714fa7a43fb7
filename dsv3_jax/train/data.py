"""Training data with grain: token streams cut into packed windows with segment ids.

Every source becomes one token stream in which each document is [BOS, ..., EOS]:
  text       a file, directory or glob of .txt (a document per file), .jsonl (a document per
             line, from `text_field`) or .parquet (a document per row); '' is the embedded
             corpus: the Python standard library's own source, present on every machine.
  tokens     a pre-tokenized .npy file of token ids (memory-mapped; see launch.prepare_data),
             documents separated by the EOS id recorded beside it in `<file>.json`.
  synthetic  uniform random tokens, one document per row (for benchmarks).
The stream is cut into windows of seq_len + 1 tokens (stride seq_len); window w gives inputs
w[:-1] and next-token targets w[1:], with segment ids that change after every EOS so no attention
and no loss crosses a document boundary. Every `eval_period`-th window is held out for eval.
Order: a grain index shuffle from the seed, reshuffled every epoch; windows are split across
processes; the iterator's state is saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
from collections.abc import Iterator

import grain
import numpy as np

from dsv3_jax.tokenizer import load_tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def embedded_corpus_files() -> list[str]:
    """The standard library's top-level modules: real text on every machine with Python."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(stdlib, "*.py")))


def text_files(path: str) -> list[str]:
    """Resolve a file, a directory (recursively) or a glob into text files, sorted."""
    if path == "":
        return embedded_corpus_files()
    if os.path.isdir(path):
        found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    elif any(ch in path for ch in "*?["):
        found = glob.glob(path, recursive=True)
    elif os.path.isfile(path):
        found = [path]
    else:
        raise ValueError(f"data.path {path!r} does not exist (give a file, a directory or a glob "
                         f"of {', '.join(TEXT_SUFFIXES)} files, or '' for the embedded corpus)")
    files = sorted(f for f in found if f.endswith(TEXT_SUFFIXES))
    if not files:
        raise ValueError(f"data.path {path!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


def _not_text(path: str) -> str:
    """Why the file at `path`, which failed to read as UTF-8 text, is not: its first bad byte,
    by line and byte offset."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
        offset = max(raw.find(b"\0"), 0)
        problem = "a NUL byte (binary data, or UTF-16 text?)"
    except UnicodeDecodeError as e:
        offset = e.start
        problem = f"byte 0x{raw[offset]:02x}, which is not UTF-8 ({e.reason})"
    line = raw.count(b"\n", 0, offset) + 1
    return (f"{path}: not UTF-8 text: {problem} at line {line} (byte offset {offset}); convert "
            "it to UTF-8 or leave it out of data.path")


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                # e.msg alone drops the position ("Invalid control character at").
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg.removesuffix(' at')} "
                                 f"at column {e.colno})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_no}: no {text_field!r} field "
                                 f"(set data.text_field)")
            yield str(record[text_field])


def read_documents(files: list[str], text_field: str) -> Iterator[str]:
    """The documents of `files`. Every file must be UTF-8 text: one that is not (a binary file
    named .txt, a Latin-1 one) is refused with the position of its first byte that is not."""
    for path in files:
        if path.endswith(".jsonl"):
            try:
                yield from _jsonl_documents(path, text_field)
            except UnicodeDecodeError:
                raise ValueError(_not_text(path)) from None
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise ValueError(f"{path}: no column {text_field!r} (columns: "
                                 f"{table.column_names}; set data.text_field)")
            yield from (str(t) for t in table.column(text_field).to_pylist())
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError:
                text = None
            if text is None or "\0" in text:
                raise ValueError(_not_text(path))
            yield text


def text_stream(path: str, text_field: str, tokenizer) -> np.ndarray:
    """Tokenize every document into one int32 stream of [BOS, ..., EOS] documents."""
    pieces = []
    for doc in read_documents(text_files(path), text_field):
        ids = tokenizer.encode(doc)
        if ids:
            pieces.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32))
    if not pieces:
        raise ValueError(f"data.path {path!r}: every document is empty")
    return np.concatenate(pieces)


def token_file_stream(path: str) -> tuple[np.ndarray, dict]:
    """A memory-mapped .npy token stream and its metadata (`<path>.json`: eos_id, vocab_size)."""
    if not os.path.isfile(path):
        raise ValueError(f"data.path {path!r}: no such token file (write one with "
                         "`python -m launch.prepare_data`)")
    meta_path = path + ".json"
    if not os.path.isfile(meta_path):
        raise ValueError(f"token file {path!r} has no metadata file {meta_path!r} "
                         "(eos_id, vocab_size)")
    with open(meta_path) as f:
        meta = json.load(f)
    try:
        stream = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise ValueError(f"token file {path!r} is not a readable .npy array ({e})") from None
    if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
        raise ValueError(f"token file {path!r} must hold a 1-D integer array, found "
                         f"{stream.dtype} of shape {stream.shape}")
    return stream, meta


def max_token(stream: np.ndarray, chunk: int = 1 << 24) -> int:
    return max(int(stream[i:i + chunk].max()) for i in range(0, len(stream), chunk))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str  # "text" | "tokens" | "synthetic"
    path: str
    text_field: str
    tokenizer: str
    seq_len: int
    eval_period: int  # every eval_period-th window is held out
    synthetic_tokens: int = 1 << 22


class TokenData:
    """Windows of a token stream, ready for grain. Validates everything before any compile."""

    def __init__(self, spec: DataSpec, vocab_size: int):
        self.spec = spec
        if spec.source == "text":
            self.tokenizer = load_tokenizer(spec.tokenizer)
            if self.tokenizer.vocab_size > vocab_size:
                raise ValueError(
                    f"data.tokenizer has {self.tokenizer.vocab_size} tokens but the model's "
                    f"vocab_size is {vocab_size}; raise model.vocab_size to at least "
                    f"{self.tokenizer.vocab_size}")
            self.stream = text_stream(spec.path, spec.text_field, self.tokenizer)
            self.eos_id = self.tokenizer.eos_id
        elif spec.source == "tokens":
            self.tokenizer = None
            self.stream, meta = token_file_stream(spec.path)
            self.eos_id = int(meta["eos_id"])
            top = max_token(self.stream)
            if top >= vocab_size or int(self.stream.min()) < 0:
                raise ValueError(f"token file {spec.path!r} holds token id {top} outside the "
                                 f"model's vocabulary [0, {vocab_size})")
            if meta.get("tokenizer"):
                self.tokenizer = load_tokenizer(meta["tokenizer"].get("path", "bytes"))
        elif spec.source == "synthetic":
            self.tokenizer, self.eos_id = None, -1
            rng = np.random.default_rng(0)
            self.stream = rng.integers(0, vocab_size, spec.synthetic_tokens, dtype=np.int32)
        else:
            raise ValueError(f"data.source {spec.source!r} is not one of text, tokens, synthetic")
        self.n_windows = (len(self.stream) - 1) // spec.seq_len
        if self.n_windows < 2 * max(spec.eval_period, 1):
            raise ValueError(
                f"data: {len(self.stream)} tokens make only {self.n_windows} windows of "
                f"seq_len {spec.seq_len}; use more data or a shorter seq_len")

    def window(self, index: int) -> dict[str, np.ndarray]:
        """tokens [seq_len + 1] and segment_ids (1-based, +1 after each EOS)."""
        L = self.spec.seq_len
        tokens = np.asarray(self.stream[index * L: index * L + L + 1], np.int32)
        after_eos = np.concatenate([[0], (tokens[:-1] == self.eos_id).astype(np.int32)])
        return {"tokens": tokens, "segment_ids": 1 + np.cumsum(after_eos, dtype=np.int32)}

    def split_indices(self, split: str) -> np.ndarray:
        index = np.arange(self.n_windows)
        held_out = (index % self.spec.eval_period) == self.spec.eval_period - 1
        return index[held_out] if split == "eval" else index[~held_out]

    def eval_batches(self, batch_per_process: int, max_batches: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """The held-out windows, each once and in order, as at most max_batches batches.

        Every process yields the same number of batches (the step is collective); rows past
        the split's end are all-zero (segment id 0 is padding, which the loss masks off), so a
        split smaller than one batch still evaluates, on exactly its own windows.
        """
        held_out = self.split_indices("eval")
        per_process = -(-len(held_out) // process_count)
        n_batches = min(max_batches, -(-per_process // batch_per_process))
        mine = held_out[process_index::process_count][:n_batches * batch_per_process]
        L = self.spec.seq_len
        for b in range(n_batches):
            batch = {"tokens": np.zeros((batch_per_process, L + 1), np.int32),
                     "segment_ids": np.zeros((batch_per_process, L + 1), np.int32)}
            for row, index in enumerate(mine[b * batch_per_process:(b + 1) * batch_per_process]):
                for key, value in self.window(int(index)).items():
                    batch[key][row] = value
            yield batch

    def dataset(self, split: str, batch_per_process: int, seed: int, process_index: int = 0,
                process_count: int = 1, shuffle: bool = True) -> grain.IterDataset:
        """Batches {tokens, segment_ids} of [batch_per_process, seq_len + 1], repeating forever."""
        indices = self.split_indices(split)[process_index::process_count]
        if len(indices) < batch_per_process:
            raise ValueError(f"data: the {split} split has {len(indices)} windows per process, "
                             f"fewer than one batch ({batch_per_process})")
        ds = grain.MapDataset.source(indices)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.repeat(None).map(self.window).batch(batch_per_process, drop_remainder=True)
        return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
