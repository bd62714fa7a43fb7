"""Tokenize text once into a token file for `--config.data.source=tokens`.

  python -m launch.prepare_data --input='corpus/*.jsonl' --output=data/corpus.npy \
      --tokenizer=path/to/tokenizer.json

Writes OUTPUT (a 1-D .npy of token ids: each document [BOS, ..., EOS]) and OUTPUT.json (eos_id,
bos_id, vocab_size, tokenizer), through temporary files renamed at the end.
"""

import json
import os

import numpy as np
from absl import app, flags

from dsv3_jax.tokenizer import load_tokenizer
from dsv3_jax.train.data import text_stream

_INPUT = flags.DEFINE_string("input", "", "A file, directory or glob of .txt/.jsonl/.parquet "
                             "('' for the embedded corpus).")
_OUTPUT = flags.DEFINE_string("output", None, "The .npy token file to write.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "bytes", "'bytes' or a tokenizer.json path.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field of .jsonl/.parquet records.")
flags.mark_flag_as_required("output")


def prepare(input_path: str, output: str, tokenizer_spec: str, text_field: str) -> dict:
    if not output.endswith(".npy"):
        raise ValueError(f"--output {output!r} must end with .npy")
    tokenizer = load_tokenizer(tokenizer_spec)
    stream = text_stream(input_path, text_field, tokenizer)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
    meta = {"eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.to_json(),
            "tokens": len(stream)}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp.npy"
    np.save(tmp, stream.astype(dtype))
    with open(output + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, output)
    os.replace(output + ".json.tmp", output + ".json")
    return meta


def main(argv):
    del argv
    meta = prepare(_INPUT.value, _OUTPUT.value, _TOKENIZER.value, _TEXT_FIELD.value)
    print(f"wrote {meta['tokens']:,} tokens to {_OUTPUT.value} (+ .json)")


if __name__ == "__main__":
    app.run(main)
