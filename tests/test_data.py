"""Data: formats and loss masking, long rows in windows, bad rows reported with file and line, seeded splits,
padding, what was split or cut counted."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from tether.data import IGNORE, Collator, encode, load_split, read_rows, split_off
from tether.errors import DataError
from tether.packing import windows
from tether.synthetic import char_tokenizer

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_prompt_completion_masks_the_prompt(tok):
    (enc,) = encode({"prompt": "2+2=", "completion": "4"}, "prompt_completion", "causal_lm", tok, 64)
    n_prompt = len(tok("2+2=")["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["input_ids"][n_prompt:-1]) == "4"
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_text_format_trains_on_every_token(tok):
    (enc,) = encode({"text": "hello"}, "text", "causal_lm", tok, 64)
    assert IGNORE not in enc["labels"]
    assert enc["labels"] == enc["input_ids"]


def test_chat_format_trains_on_the_assistant_turn(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (enc,) = encode({"messages": messages}, "chat", "causal_lm", tok, 128)
    target = [i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE]
    assert tok.decode(target[:-1]).strip() == "yo"


def test_rows_without_target_are_dropped_and_long_text_is_windowed(tok):
    assert encode({"prompt": "x" * 40, "completion": "y"}, "prompt_completion", "causal_lm", tok, 16) == []
    pieces = encode({"text": "z" * 40}, "text", "causal_lm", tok, 16)
    assert [len(p["input_ids"]) for p in pieces] == [16, 16, 9]  # 40 characters + eos: nothing cut


@pytest.mark.parametrize("overlap", [0, 1, 5])
def test_windows_cover_every_token_and_train_each_once(overlap):
    ids = list(range(100, 147))
    pieces = windows(ids, list(ids), 16, overlap)
    assert all(len(p["input_ids"]) <= 16 for p in pieces)
    trained = [t for p in pieces for t, lab in zip(p["input_ids"][1:], p["labels"][1:]) if lab != IGNORE]
    # each window's first token is predicted from nothing; with overlap it was trained in the window before
    expected = ids[1:] if overlap else [t for i, t in enumerate(ids) if i % 16]
    assert trained == expected
    assert pieces[-1]["input_ids"][-1] == ids[-1]


def test_classification_rows(tok):
    (enc,) = encode({"text": "good film", "label": 1}, "text", "sequence_classification", tok, 64)
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
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "a", "label": 1.5}])
    with pytest.raises(DataError, match=r"c.jsonl:2: 'label' must be a class id \(integer from 0\) or name"):
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
    rows = [*encode({"prompt": "1+1=", "completion": "2"}, "prompt_completion", "causal_lm", tok, 32),
            *encode({"prompt": "10+10=", "completion": "20"}, "prompt_completion", "causal_lm", tok, 32)]  # fmt: skip
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


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b\u0085c\u2029d"}, ensure_ascii=False) + "\r\n" + '{"text": "e"}\n')
    rows = read_rows(str(path), "train")
    assert [r["text"] for r in rows] == ["a\u2028b\u0085c\u2029d", "e"] and [r["_line"] for r in rows] == [1, 2]


def test_windows_of_a_row_stay_on_one_side_of_the_split(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"{i} " + "w" * (10 * i)} for i in range(12)])
    split = load_split(str(path), "train", "text", "causal_lm", tok, 16)
    train, val = split_off(split, 0.25, seed=0)
    assert len(train.encoded) + len(val.encoded) == len(split.encoded) > 12
    assert not {r["_line"] for r in train.rows} & {r["_line"] for r in val.rows}
    assert val.stats.rows == 3 and train.stats.rows == 9
    assert train.stats.split + val.stats.split == split.stats.split == 10  # rows 2..11 are longer than 16 tokens
    rows = [{"prompt": "p" * 20, "completion": "c"}] + [{"prompt": "p", "completion": "c" * 20}] * 3
    pc = load_split(str(write_jsonl(tmp_path / "pc.jsonl", rows)), "train", "prompt_completion", "causal_lm", tok, 16)
    parts = split_off(pc, 0.5, seed=0)
    assert sum(p.stats.truncated for p in parts) == pc.stats.truncated == 3 and parts[0].stats.dropped == 1


def test_stats_count_windows_cut_and_dropped_rows(tmp_path, tok):
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "short"}, {"text": "x" * 40}, {"text": "y" * 15}])
    stats = load_split(str(text), "train", "text", "causal_lm", tok, 16).stats
    assert (stats.rows, stats.examples, stats.split, stats.truncated, stats.dropped) == (3, 5, 1, 0, 0)
    assert stats.tokens == 6 + 41 + 16
    rows = [
        {"prompt": "p" * 20, "completion": "c"},
        {"prompt": "p", "completion": "c" * 20},
        {"prompt": "a", "completion": "b"},
    ]
    pc = write_jsonl(tmp_path / "pc.jsonl", rows)
    stats = load_split(str(pc), "train", "prompt_completion", "causal_lm", tok, 16).stats
    assert (stats.rows, stats.examples, stats.split, stats.truncated, stats.dropped) == (3, 2, 0, 1, 1)


def cli(monkeypatch, capsys, *args: str) -> tuple[int | None, str, str]:
    """tether's main() in this process: exit code (None when it returned), stdout and stderr."""
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", *args])
    try:
        main()
        code = None
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def saved_model(directory: Path, pad: bool, eos: bool) -> Path:
    from tether.synthetic import tiny_model

    tok = char_tokenizer()
    tiny_model("llama", "causal_lm", len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(
        directory
    )
    if not pad:
        tok.pad_token = None
    if not eos:
        tok.eos_token = None
    tok.save_pretrained(directory)
    return directory


def test_a_tokenizer_without_pad_and_eos_is_one_line_in_validate_and_train(tmp_path, monkeypatch, capsys, raw_config):
    raw_config["model"] = {"path": str(saved_model(tmp_path / "m", pad=False, eos=False))}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    capsys.readouterr()  # the save's progress bar
    for command in ("validate", "train"):
        code, _, err = cli(monkeypatch, capsys, command, str(path))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert (
            'has no pad token and no eos token: set "pad_token" (and "eos_token") in its tokenizer_config.json' in err
        )
    assert not Path(raw_config["output_dir"]).exists()
    raw_config["model"] = {"path": str(saved_model(tmp_path / "m2", pad=False, eos=True))}  # pad from eos
    path.write_text(yaml.safe_dump(raw_config))
    code, out, _ = cli(monkeypatch, capsys, "validate", str(path))
    assert code is None and "data train: 48 rows" in out


def test_eval_scores_any_file_and_names_it(tmp_path, monkeypatch, capsys, raw_config, data_files):
    raw_config["training"].update(max_steps=2, eval_steps=2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config))
    assert cli(monkeypatch, capsys, "train", str(path))[0] is None
    model = str(Path(raw_config["output_dir"]) / "model")
    code, out, err = cli(
        monkeypatch, capsys, "eval", str(path), "--model", model, "--data", str(data_files["reference"])
    )
    result = json.loads(out)
    assert code is None and result["data"] == str(data_files["reference"]) and result["rows"] == 12
    assert result["loss"] > 0
    code, out, _ = cli(monkeypatch, capsys, "eval", str(path), "--model", model)
    assert json.loads(out)["data"] == str(data_files["validation"])
    code, _, err = cli(monkeypatch, capsys, "eval", str(path), "--model", model, "--data", str(tmp_path / "no.jsonl"))
    assert code == 2 and "--data" in err and "does not exist" in err


def test_no_transformers_warning_about_long_rows(tmp_path, caplog):
    tok = char_tokenizer()
    tok.model_max_length = 16  # a model's maximum, as a real tokenizer states it
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 40}])
    with caplog.at_level(logging.WARNING):
        split = load_split(str(path), "train", "text", "causal_lm", tok, 16)
    assert split.stats.split == 1 and "Token indices sequence length" not in caplog.text


def test_a_file_starting_with_a_utf8_bom_is_read(tmp_path, monkeypatch, capsys, raw_config, data_files):
    """Windows editors start a UTF-8 file with a BOM: every data file (train here, the reference, replay.source,
    ewc.data through the same reader) is read as if it had none."""
    for name in ("train", "reference"):
        path = data_files[name]
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config))
    code, out, err = cli(monkeypatch, capsys, "validate", str(config))
    assert code is None and "data train: 48 rows" in out and "data reference: 12 rows" in out, err
    assert [r["_line"] for r in read_rows(str(data_files["reference"]), "reference")] == list(range(1, 13))


EMPTY_ROWS = [
    ("text", "causal_lm", {"text": ""}, "the text is empty"),
    ("text", "causal_lm", {"text": " \n"}, "the text is empty"),
    ("prompt_completion", "causal_lm", {"prompt": "1+1=", "completion": ""}, "the completion is empty"),
    ("prompt_completion", "causal_lm", {"prompt": "1+1=", "completion": "  "}, "the completion is empty"),
    ("chat", "causal_lm", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "the assistant turn messages[1] is empty"),
    ("chat", "causal_lm", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "},
                                        {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]},
     "the assistant turn messages[1] is empty"),
    ("text", "sequence_classification", {"text": "", "label": 1}, "the text is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "task", "row", "message"), EMPTY_ROWS)
def test_a_row_with_nothing_to_learn_is_refused_naming_the_line(tmp_path, tok, fmt, task, row, message):
    good = {"text": "ab", "label": 0} if task != "causal_lm" else {"text": "ab", "prompt": "a", "completion": "b"}
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]} | good
    path = write_jsonl(tmp_path / "e.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_split(str(path), "train", fmt, task, tok, 32)
    assert str(e.value) == f"data.train: {path}:2: {message}: fill or remove the row"


def test_an_empty_completion_is_one_line_in_validate_and_train(tmp_path, monkeypatch, capsys, raw_config):
    rows = [json.loads(line) for line in Path(raw_config["data"]["train"]).read_text().splitlines()]
    rows[11]["completion"] = ""
    write_jsonl(Path(raw_config["data"]["train"]), rows)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config))
    outcomes = [cli(monkeypatch, capsys, command, str(config)) for command in ("validate", "train")]
    assert outcomes[0] == outcomes[1] and outcomes[0][0] == 2, outcomes
    expected = f"error: data.train: {raw_config['data']['train']}:12: the completion is empty: fill or remove the row"
    assert outcomes[0][2].strip() == expected
    assert not Path(raw_config["output_dir"]).exists()


def test_an_assistant_turn_that_calls_a_tool_may_have_no_text(tmp_path, tok):
    """A tool call is what such a turn says (the template renders it): it has something to learn."""
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    rows = [{"messages": [{"role": "user", "content": "a"}, call, {"role": "assistant", "content": "b"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    assert load_split(str(path), "train", "chat", "causal_lm", tok, 64).stats.rows == 1
