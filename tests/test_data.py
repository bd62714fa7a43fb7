"""Data: sources, packing with segment ids, splits, determinism, resumable iteration, errors."""

import json

import numpy as np
import pytest

from dsv3_jax.tokenizer import ByteTokenizer, load_tokenizer
from dsv3_jax.train.data import DataSpec, TokenData, text_files
from launch.prepare_data import prepare

VOCAB = 320


def spec(**kw):
    base = dict(source="text", path="", text_field="text", tokenizer="bytes", seq_len=64,
                eval_period=10)
    base.update(kw)
    return DataSpec(**base)


def test_embedded_corpus_is_real_text():
    data = TokenData(spec(), VOCAB)
    assert len(text_files("")) > 50 and len(data.stream) > 1_000_000
    text = ByteTokenizer().decode(data.stream[:5000])
    assert "import" in text and "def " in text


def test_windows_pack_documents_with_segment_ids(tmp_path):
    docs = ["alpha beta", "gamma", "delta epsilon zeta " * 3]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs * 5))
    data = TokenData(spec(path=str(tmp_path / "docs.jsonl"), text_field="body", seq_len=16,
                          eval_period=2), VOCAB)
    tok = ByteTokenizer()
    assert data.stream[0] == tok.bos_id and data.stream[11] == tok.eos_id
    w = data.window(0)
    assert w["tokens"].shape == (17,)
    # the segment changes right after each EOS and only there
    for i in range(1, 17):
        changed = w["segment_ids"][i] != w["segment_ids"][i - 1]
        assert changed == (w["tokens"][i - 1] == tok.eos_id)


def test_splits_are_disjoint_and_order_follows_the_seed():
    data = TokenData(spec(), VOCAB)
    train, held = set(data.split_indices("train")), set(data.split_indices("eval"))
    assert train.isdisjoint(held) and len(held) == data.n_windows // 10
    a = next(iter(data.dataset("train", 4, seed=1)))["tokens"]
    b = next(iter(data.dataset("train", 4, seed=1)))["tokens"]
    c = next(iter(data.dataset("train", 4, seed=2)))["tokens"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_processes_read_disjoint_windows():
    data = TokenData(spec(), VOCAB)
    firsts = [next(iter(data.dataset("train", 8, 0, p, 2, shuffle=False)))["tokens"]
              for p in range(2)]
    assert not any(np.array_equal(x, y) for x in firsts[0] for y in firsts[1])


def test_iterator_state_resumes_exactly():
    data = TokenData(spec(), VOCAB)
    it = iter(data.dataset("train", 4, seed=0))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    again = iter(data.dataset("train", 4, seed=0))
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again)["tokens"], want)


def test_txt_parquet_and_token_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("hello world " * 200)
    pq.write_table(pa.table({"text": ["parquet row " * 50] * 20}), tmp_path / "b.parquet")
    data = TokenData(spec(path=str(tmp_path), seq_len=32, eval_period=2), VOCAB)
    assert ByteTokenizer().decode(data.stream).count("parquet row") == 1000
    meta = prepare(str(tmp_path), str(tmp_path / "tok" / "t.npy"), "bytes", "text")
    tokens = TokenData(spec(source="tokens", path=str(tmp_path / "tok" / "t.npy"), seq_len=32,
                            eval_period=2), VOCAB)
    assert meta["tokens"] == len(data.stream)
    np.testing.assert_array_equal(np.asarray(tokens.stream), data.stream)
    np.testing.assert_array_equal(tokens.window(3)["segment_ids"], data.window(3)["segment_ids"])


def test_bad_data_is_refused_with_the_value_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TokenData(spec(path=str(tmp_path / "nope")), VOCAB)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        TokenData(spec(path=str(tmp_path / "bad.jsonl")), VOCAB)
    (tmp_path / "f.jsonl").write_text('{"body": "ok"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        TokenData(spec(path=str(tmp_path / "f.jsonl")), VOCAB)
    with pytest.raises(ValueError, match="model's vocab_size is 100"):
        TokenData(spec(), 100)
    np.save(tmp_path / "t.npy", np.array([1, 2, 999] * 1000, np.int32))
    (tmp_path / "t.npy.json").write_text('{"eos_id": 1}')
    with pytest.raises(ValueError, match="token id 999 outside the model's vocabulary"):
        TokenData(spec(source="tokens", path=str(tmp_path / "t.npy")), VOCAB)
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(ValueError, match="only 0 windows"):
        TokenData(spec(path=str(tmp_path / "tiny.txt")), VOCAB)


def test_hugging_face_tokenizer_json(tmp_path):
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    text = "def f(x):\n    return x + 1\n" * 200
    tok.train_from_iterator([text], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(text)
    (tmp_path / "corpus" / "b.txt").write_text(text.upper())
    data = TokenData(spec(path=str(tmp_path / "corpus"), tokenizer=str(tmp_path /
                                                                       "tokenizer.json"),
                          seq_len=16, eval_period=2), 320)
    hf = data.tokenizer
    assert (hf.bos_id, hf.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    assert int((data.stream == hf.eos_id).sum()) == 2  # one per document
    assert hf.decode(data.stream[1:8]).strip().startswith("def f(x):")
    too_small = hf.vocab_size - 1
    with pytest.raises(ValueError, match=rf"raise model.vocab_size to at least {hf.vocab_size}"):
        TokenData(spec(path=str(tmp_path / "corpus"), tokenizer=str(tmp_path /
                                                                    "tokenizer.json")), too_small)


@pytest.mark.parametrize("content, problem", [
    ("", "the file is empty"),
    ('{"model": {"type": "BPE", ', "is not valid JSON: Expecting property name enclosed in double "
     "quotes at line 1 column 27"),
    ('{"model_type": "deepseek_v3"}', "is JSON but not a Hugging Face tokenizer.json"),
    ('{"model": {"type": "NoSuchModel"}}', "is not a valid tokenizer.json: "),
], ids=["empty", "truncated", "a-config-json", "unknown-model"])
def test_unreadable_tokenizer_json_is_refused_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    # TokenData (data.tokenizer) and launch.generate's --tokenizer share load_tokenizer
    with pytest.raises(ValueError) as error:
        TokenData(spec(tokenizer=str(path)), VOCAB)
    assert str(error.value).startswith(f"tokenizer {str(path)!r}")
    assert problem in str(error.value)
    with pytest.raises(ValueError, match=r"did you mean .*tokenizer\.json"):
        load_tokenizer(str(tmp_path))  # the directory that holds it


def test_text_files_that_are_not_utf8_are_refused_with_the_position(tmp_path):
    (tmp_path / "ok.txt").write_text("plain text\n" * 50)
    (tmp_path / "image.txt").write_bytes(b"line one\nline two\n\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(ValueError) as error:
        TokenData(spec(path=str(tmp_path)), VOCAB)
    assert str(error.value) == (
        f"{tmp_path / 'image.txt'}: not UTF-8 text: byte 0x89, which is not UTF-8 (invalid "
        "start byte) at line 3 (byte offset 18); convert it to UTF-8 or leave it out of "
        "data.path")
    (tmp_path / "image.txt").unlink()
    # UTF-16 without a byte-order mark decodes as UTF-8, with a NUL byte every other byte
    (tmp_path / "wide.txt").write_bytes("hi\nthere".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"wide.txt: not UTF-8 text: a NUL byte .* at line 1 "
                                         r"\(byte offset 1\)"):
        TokenData(spec(path=str(tmp_path)), VOCAB)
    (tmp_path / "wide.txt").unlink()
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl: not UTF-8 text: byte 0xe9, .* at line 2 "
                                         r"\(byte offset 28\)"):
        TokenData(spec(path=str(tmp_path / "latin1.jsonl")), VOCAB)


def test_malformed_jsonl_keeps_the_line_and_column(tmp_path):
    (tmp_path / "tab.jsonl").write_text('{"text": "ok"}\n\n{"text": "a\tb"}\n')
    with pytest.raises(ValueError) as error:
        TokenData(spec(path=str(tmp_path / "tab.jsonl")), VOCAB)
    assert str(error.value) == (f"{tmp_path / 'tab.jsonl'}:3: not valid JSON (Invalid control "
                                "character at column 12)")
    (tmp_path / "comma.jsonl").write_text('{"text": "ok" "more": 1}\n')
    with pytest.raises(ValueError, match=r"comma.jsonl:1: not valid JSON \(Expecting ',' "
                                         r"delimiter at column 15\)"):
        TokenData(spec(path=str(tmp_path / "comma.jsonl")), VOCAB)


def test_eval_batches_cover_the_held_out_windows_once_and_pad_a_small_split():
    data = TokenData(spec(seq_len=4096, eval_period=50), VOCAB)
    held = data.split_indices("eval")
    assert 0 < len(held) < 32  # the `small` preset's case: fewer held-out windows than a batch
    batches = list(data.eval_batches(32, 4))
    assert len(batches) == 1 and batches[0]["tokens"].shape == (32, 4097)
    rows = batches[0]
    for row, index in enumerate(held):
        np.testing.assert_array_equal(rows["tokens"][row], data.window(int(index))["tokens"])
    # the rows past the split are padding: segment id 0, which every loss mask excludes
    assert not rows["segment_ids"][len(held):].any() and rows["segment_ids"][:len(held)].all()


def test_eval_batches_are_capped_and_equal_in_number_across_processes():
    data = TokenData(spec(eval_period=10), VOCAB)
    held = data.split_indices("eval")
    assert len(list(data.eval_batches(4, 3))) == 3
    # 2 processes of a split of odd length still step the same number of times
    short = held[:7]
    data.split_indices = lambda split: short
    per_process = [list(data.eval_batches(2, 100, p, 2)) for p in range(2)]
    assert [len(b) for b in per_process] == [2, 2]
    seen = [w for batches in per_process for b in batches for w in b["tokens"] if w.any()]
    assert len(seen) == 7
