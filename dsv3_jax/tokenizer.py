"""Tokenizers: byte-level (the default) and any Hugging Face `tokenizer.json`, with one loader
(`load_tokenizer`) that training data, generation and conversion share.
"""

from __future__ import annotations

import json
import os


class ByteTokenizer:
    """UTF-8 bytes 0-255, then BOS=256, EOS=257, PAD=258."""

    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "bytes"}


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library."""

    EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
    BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>")

    def __init__(self, path: str):
        self.path = path
        self._tok = _read_tokenizer_json(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.eos_id = next((vocab[n] for n in self.EOS_NAMES if n in vocab), None)
        self.bos_id = next((vocab[n] for n in self.BOS_NAMES if n in vocab), self.eos_id)
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r} has none of the end-of-text tokens "
                             f"{self.EOS_NAMES}; documents could not be separated")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        return {"kind": "hf", "path": os.path.abspath(self.path)}


def _read_tokenizer_json(path: str):
    """A `tokenizers.Tokenizer` from `path`, or a ValueError naming the file and its problem
    (the library's own errors name neither the file nor, for an empty one, the cause)."""
    import tokenizers

    if not os.path.isfile(path):
        inside = os.path.join(path, "tokenizer.json")
        hint = f"; did you mean {inside!r}?" if os.path.isfile(inside) else ""
        problem = "is a directory" if os.path.isdir(path) else "no such file"
        raise ValueError(f"tokenizer {path!r}: {problem} (give 'bytes' or the path of a "
                         f"Hugging Face tokenizer.json){hint}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"tokenizer {path!r}: the file is empty")
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer {path!r} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"tokenizer {path!r} is not a JSON file (not UTF-8 text)") from None
    if not isinstance(record, dict) or "model" not in record:
        raise ValueError(f"tokenizer {path!r} is JSON but not a Hugging Face tokenizer.json (it "
                         "has no 'model' entry: a config.json or tokenizer_config.json?)")
    try:
        return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise ValueError(f"tokenizer {path!r} is not a valid tokenizer.json: {e}") from None


def load_tokenizer(spec: str):
    """'bytes' or the path of a Hugging Face tokenizer.json."""
    return ByteTokenizer() if spec in ("", "bytes") else HFTokenizer(spec)
