"""What a pre-trained checkpoint limits or lacks, refused by `tether validate` and `tether train` in one line, exit 2,
nothing written: data.max_length past a learned position table, a model folder saved without its tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.archs import ARCHS, tiny
from tether.models import position_limit
from tether.synthetic import char_tokenizer

LEARNED = ["gpt2", "opt", "bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta-v2"]
UNLIMITED = ["llama", "qwen2", "mistral", "gpt_neox", "bloom", "falcon", "phi", "modernbert", "mamba"]


def _forward(model: torch.nn.Module, length: int) -> None:
    ids = torch.arange(length) % 90 + 4  # no pad, bos or eos id: RoBERTa numbers the positions of non-pad tokens
    with torch.no_grad():
        model(input_ids=ids[None], attention_mask=torch.ones(1, length, dtype=torch.long))


@pytest.mark.parametrize("arch", LEARNED)
def test_the_limit_is_the_longest_row_a_forward_takes(arch: str) -> None:
    model = tiny(arch).eval()
    limit = position_limit(model)
    assert limit is not None and limit.count == 64
    _forward(model, limit.positions)
    with pytest.raises((IndexError, RuntimeError)):
        _forward(model, limit.positions + 1)


@pytest.mark.parametrize("arch", UNLIMITED)
def test_rotary_alibi_and_relative_models_have_no_limit(arch: str) -> None:
    model = tiny(arch).eval()
    assert position_limit(model) is None
    _forward(model, 80)  # past max_position_embeddings 64


def test_deberta_with_relative_attention_only_has_no_limit() -> None:
    model = tiny("deberta-v2", relative_attention=True, position_biased_input=False).eval()
    assert position_limit(model) is None
    _forward(model, 80)


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`tether ARGS` in this process: the exit status (0 when main returns), stdout and stderr."""
    from tether.cli import main

    capsys.readouterr()  # what came before (save_pretrained's progress bars)
    monkeypatch.setattr(sys, "argv", ["tether", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(root: Path, model: Path, arch: str, max_length: int, **data: Any) -> Path:
    """A config training `model` (an arch of tests/archs.py) on rows longer than 64 tokens: windows for causal_lm,
    rows cut at max_length for classification."""
    text = "the quick brown fox jumps over the lazy dog. " * 4  # 180 characters, one token each
    causal = ARCHS[arch] == "causal_lm"
    rows = [{"text": text[i:]} if causal else {"text": text[i:], "label": i % 2} for i in range(8)]
    raw = {
        "model": {"path": str(model)},
        "task": ARCHS[arch],
        "data": {"train": str(_write_rows(root / "train.jsonl", rows)), "format": "text", "max_length": max_length}
        | data,
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "eval_strategy": "no", "save_strategy": "no"},
        "output_dir": str(root / "run"),
    }
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _saved(arch: str, root: Path, tokenizer: bool = True) -> Path:
    path = root / f"{arch}-model"
    tiny(arch).save_pretrained(path)
    if tokenizer:
        char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("arch", "limit", "field"),
    [("gpt2", 64, "n_positions 64"), ("bert", 64, "max_position_embeddings 64"),
     ("roberta", 63, "max_position_embeddings 64, less the rows before its first position")],
)  # fmt: skip
def test_max_length_past_the_learned_positions_is_refused(tmp_path, monkeypatch, capsys, arch, limit, field):
    model = _saved(arch, tmp_path)
    config, out = _config(tmp_path, model, arch, limit + 1), tmp_path / "run"
    code, _, err = _cli(monkeypatch, capsys, "validate", str(config))
    train_code, _, train_err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(out))
    eval_code, _, eval_err = _cli(monkeypatch, capsys, "eval", str(config), "--model", str(model))
    assert (code, train_code, eval_code) == (2, 2, 2) and err == train_err == eval_err, train_err
    assert len(err.strip().splitlines()) == 1, err
    assert " ".join(err.split()) == (
        f"error: data.max_length {limit + 1} is longer than the {limit} positions this model's learned position "
        f"embeddings hold ({field}): lower data.max_length to {limit} or less"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    ("arch", "max_length", "data"),
    [("gpt2", 64, {}), ("gpt2", 64, {"packing": True}), ("bert", 64, {}), ("roberta", 63, {}),
     ("llama", 128, {}), ("llama", 128, {"packing": True})],
)  # fmt: skip
def test_max_length_within_the_positions_trains(tmp_path, monkeypatch, capsys, arch, max_length, data):
    """At the limit (windows and packed rows number positions from 0), and past a rotary model's
    max_position_embeddings, which is no limit."""
    config = _config(tmp_path, _saved(arch, tmp_path), arch, max_length, **data)
    code, out, err = _cli(monkeypatch, capsys, "validate", str(config))
    assert code == 0 and out.startswith("ok "), err
    code, out, err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(tmp_path / "run"))
    assert code == 0 and "done" in out, err


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # gpt2's class loads empty, llama's fails with a list
def test_a_model_folder_without_its_tokenizer_is_one_line(tmp_path, monkeypatch, capsys, arch):
    model = _saved(arch, tmp_path, tokenizer=False)
    config, out = _config(tmp_path, model, arch, 32), tmp_path / "run"
    code, _, err = _cli(monkeypatch, capsys, "validate", str(config))
    train_code, _, train_err = _cli(monkeypatch, capsys, "train", str(config), "--output-dir", str(out))
    assert (code, train_code) == (2, 2) and err == train_err and len(err.strip().splitlines()) == 1, train_err
    assert " ".join(err.split()) == (
        f"error: model.path: {model} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary "
        f"file): save it there with tokenizer.save_pretrained('{model}'), or copy in the tokenizer files of the "
        "model it was fine-tuned from"
    )
    assert not out.exists()


def test_a_tokenizer_config_without_a_vocabulary_is_one_line(tmp_path, monkeypatch, capsys):
    """A tokenizer_config.json alone: gpt2's tokenizer class loads with no vocabulary but its special tokens."""
    model = _saved("gpt2", tmp_path, tokenizer=False)
    (model / "tokenizer_config.json").write_text("{}")
    code, _, err = _cli(monkeypatch, capsys, "validate", str(_config(tmp_path, model, "gpt2", 32)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert " ".join(err.split()) == (
        f"error: model.path: the tokenizer in {model} has no vocabulary, only its special tokens: save the whole "
        f"tokenizer there with tokenizer.save_pretrained('{model}')"
    )


def test_a_tokenizer_that_fails_to_load_is_one_whole_line(tmp_path, monkeypatch, capsys):
    """llama's fails with a first line that ends in a colon, a list after it: kept whole, not cut at the colon."""
    model = _saved("llama", tmp_path, tokenizer=False)
    (model / "tokenizer_config.json").write_text("{}")
    code, _, err = _cli(monkeypatch, capsys, "validate", str(_config(tmp_path, model, "llama", 32)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = " ".join(err.split())
    assert line.startswith(f"error: model.path: cannot load '{model}': Couldn't instantiate the backend tokenizer "
                           "from one of: (1) a `tokenizers` library serialization file, (2) "), line  # fmt: skip
    assert line.endswith("."), line


def test_recall_keeps_the_end_of_a_prompt_longer_than_the_positions() -> None:
    """Greedy recall generates from the whole prompt: past a learned position table it keeps the prompt's end (the
    loss examples are cut at max_length; the prompts recall reads are not), which generates what the end alone does
    and not what the start does."""
    from tether.recall import _greedy

    model, tokenizer = tiny("gpt2").eval(), char_tokenizer()  # one token a character, no BOS added
    limit, new = position_limit(model).positions, 4
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(limit + 10))
    generated = _greedy(model, tokenizer, [prompt], new)
    assert generated == _greedy(model, tokenizer, [prompt[-(limit - new) :]], new)
    assert generated != _greedy(model, tokenizer, [prompt[: limit - new]], new)


def test_the_api_cuts_reference_rows_to_the_positions_a_model_holds() -> None:
    """tether.knowledge and tether.regularize encode reference rows up to 1024 tokens (or TRL's max_length): past
    a learned position table they are windowed to what it holds (GPT-2 with 64 positions raised IndexError)."""
    import math

    import tether

    model, tokenizer = tiny("gpt2").eval(), char_tokenizer()
    limit = position_limit(model).positions
    long_row = {"text": "".join(chr(97 + i % 26) for i in range(3 * limit))}
    measured = tether.knowledge(model, tokenizer, [long_row])
    assert math.isfinite(measured["loss"])
    assert measured == tether.knowledge(model, tokenizer, [long_row], max_length=limit)
