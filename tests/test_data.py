"""Data: formats and loss masking, bad rows reported with file and line, seeded splits, padding."""

from __future__ import annotations

import pytest

from tether.data import IGNORE, Collator, encode, load_split, read_rows, split_off
from tether.errors import DataError
from tether.synthetic import char_tokenizer

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_prompt_completion_masks_the_prompt(tok):
    enc = encode({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "causal_lm", tok, 64)
    n_prompt = len(tok("2+2=")["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["input_ids"][n_prompt:-1]) == "4"
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_text_format_trains_on_every_token(tok):
    enc = encode({"text": "hello"}, "text", "causal_lm", tok, 64)
    assert IGNORE not in enc["labels"]
    assert enc["labels"] == enc["input_ids"]


def test_chat_format_trains_on_last_assistant_turn_only(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    enc = encode({"messages": messages}, "chat", "causal_lm", tok, 128)
    target = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tok.decode(target[:-1]).strip() == "yo"


def test_truncation_and_rows_without_target(tok):
    enc = encode({"prompt": "x" * 40, "completion": "y"}, "prompt_completion", "causal_lm", tok, 16)
    assert enc is None  # the prompt fills max_length: nothing to learn from
    enc = encode({"text": "z" * 40}, "text", "causal_lm", tok, 16)
    assert len(enc["input_ids"]) == 16


def test_classification_rows(tok):
    enc = encode({"text": "good film", "label": 1}, "text", "sequence_classification", tok, 64)
    assert enc["labels"] == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', "bad.jsonl:2: invalid JSON"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "bad.jsonl:2: missing field 'completion'"),
        (b'{"prompt": 3, "completion": "b"}\n', "bad.jsonl:1: 'prompt' must be a string"),
        (b"[1, 2]\n", "bad.jsonl:1: each line must be a JSON object"),
        (b"\n\n", "holds no rows"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe"}\n', "bad.jsonl:2: not UTF-8"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, tok, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_split(str(path), "train", "prompt_completion", "causal_lm", tok, 32)
    assert expected in str(e.value)
    assert str(e.value).startswith("data.train: ")


def test_bad_classification_label(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "pos"}])
    with pytest.raises(DataError, match="'label' must be an integer"):
        load_split(str(path), "train", "text", "sequence_classification", tok, 32)


def test_bad_chat_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="ending with an assistant turn"):
        load_split(str(path), "train", "chat", "causal_lm", tok, 32)


def test_split_is_seeded_disjoint_and_complete(tmp_path, tok, data_files):
    split = load_split(str(data_files["train"]), "train", "prompt_completion", "causal_lm", tok, 32)
    a_train, a_val = split_off(split, 0.25, seed=3)
    b_train, b_val = split_off(split, 0.25, seed=3)
    _, c_val = split_off(split, 0.25, seed=4)
    assert a_val.rows == b_val.rows and a_train.rows == b_train.rows
    assert a_val.rows != c_val.rows
    assert len(a_val.encoded) == 12 and len(a_train.encoded) == 36
    keys = {(r["prompt"], r["_line"]) for r in a_train.rows} & {(r["prompt"], r["_line"]) for r in a_val.rows}
    assert not keys


def test_collator_pads_with_ignore(tok):
    rows = [encode({"prompt": "1+1=", "completion": "2"}, "prompt_completion", "causal_lm", tok, 32),
            encode({"prompt": "10+10=", "completion": "20"}, "prompt_completion", "causal_lm", tok, 32)]  # fmt: skip
    batch = Collator(tok.pad_token_id)(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(rows[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE).all()
    assert (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == tok.pad_token_id).all()


def test_read_rows_from_saved_dataset_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r["text"] for r in read_rows(str(tmp_path / "ds"), "train")] == ["a", "b"]
