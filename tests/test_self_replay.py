"""self_replay: generated rows mixed in as replay mixes, seeded, filtered, cached in the run directory and reused (a
resumed run, a run killed during generation), refused where it cannot generate; one `tether train` run resumed."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.test_param_regularizers import VOCAB, rows_of
from tether.config import validate_config
from tether.data import IGNORE
from tether.errors import ConfigError, TetherError
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext, parse_entries
from tether.regularizers import self_replay as module
from tether.regularizers.self_replay import CACHE, SelfReplay, SelfReplayConfig, filtered
from tether.run import train
from tether.synthetic import tiny_model

FIELDS = {"ratio": 0.25, "max_new_tokens": 5, "batch_size": 4, "min_new_tokens": 1}


def model_of() -> torch.nn.Module:
    return tiny_model("llama", "causal_lm", VOCAB, hidden_size=16, num_layers=2, num_heads=2, seed=0)


def generated(tmp_path: Path | None, model: torch.nn.Module | None = None, **fields: Any) -> tuple[list, SelfReplay]:
    """The mixed training rows of a fresh SelfReplay over 12 training rows and 6 reference rows."""
    reg = SelfReplay(SelfReplayConfig(name="self_replay", **{**FIELDS, **fields}))
    ctx = SetupContext(model or model_of(), output_dir=tmp_path)
    return reg.train_data(rows_of(12, seed=1), rows_of(6, seed=2), 0, ctx=ctx), reg


def counting_samples(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = module.sample

    def counted(*args: Any) -> Any:
        calls.append(len(args[1]))
        return original(*args)

    monkeypatch.setattr(module, "sample", counted)
    return calls


def test_generated_rows_continue_the_reference_prompts_and_are_mixed_in(tmp_path: Path):
    mixed, reg = generated(tmp_path)
    train, added = mixed[:12], mixed[12:]
    assert train == rows_of(12, seed=1) and len(added) == 4  # 0.25 of the mix: 4 / (12 + 4)
    prompts = {tuple(r["input_ids"][:3]) for r in rows_of(6, seed=2)}
    for row in added:
        assert tuple(row["input_ids"][:3]) in prompts and row["labels"][:3] == [IGNORE] * 3
        assert row["labels"][3:] == row["input_ids"][3:] and 1 <= len(row["input_ids"]) - 3 <= 5
    assert reg.counts["generated"] == 4 and reg.counts["examples"] == 4 and reg.counts["share_examples"] == 0.25
    assert (tmp_path / CACHE).is_file()


def test_generation_is_seeded(tmp_path: Path):
    first, _ = generated(tmp_path / "a")
    again, _ = generated(tmp_path / "b")
    other, _ = generated(tmp_path / "c", seed=5)
    assert first == again and first != other


def test_the_cache_is_reused_and_a_cut_generation_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    whole, _ = generated(tmp_path / "whole", samples=10)
    cut = tmp_path / "cut"
    generated(cut, samples=10)
    lines = (cut / CACHE).read_text().splitlines(keepends=True)
    assert len(lines) == 4  # the key, then batches of 4, 4 and 2 rows
    (cut / CACHE).write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed while writing batch 1
    calls = counting_samples(monkeypatch)
    resumed, _ = generated(cut, samples=10)
    assert calls == [4, 2] and resumed == whole  # only the missing batches, with the seeds they would have had
    calls.clear()
    again, _ = generated(cut, samples=10)
    assert calls == [] and again == whole
    model = model_of()
    with torch.no_grad():
        next(model.parameters()).add_(0.1)
    generated(cut, model, samples=10)  # another model: the cache does not apply
    assert calls == [4, 4, 2]


def test_unconditioned_rows_start_from_bos(tmp_path: Path):
    mixed, _ = generated(tmp_path, prompts="bos")
    assert all(row["input_ids"][0] == 1 and row["labels"][0] == IGNORE for row in mixed[12:])


def test_filters_drop_short_high_perplexity_and_duplicate_rows():
    cfg = SelfReplayConfig(name="self_replay", min_new_tokens=2, max_perplexity=10)
    row = {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "labels": [IGNORE, 6, 7], "nll": 1.0}
    rows = [
        row,
        {**row, "labels": [IGNORE, IGNORE, 7]},  # one new token
        {**row, "input_ids": [5, 6, 8], "nll": math.log(11)},  # perplexity 11
        {**row, "input_ids": [5, 6, 9], "nll": math.nan},
        dict(row),  # the first again
    ]
    kept, dropped = filtered(rows, cfg)
    assert kept == [{k: v for k, v in row.items() if k != "nll"}]
    assert dropped == {"short": 1, "perplexity": 2, "duplicate": 1}


def test_row_nll_is_the_mean_loss_of_the_generated_tokens():
    model = model_of()
    rows = [{"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [IGNORE, IGNORE, 7, 8]},
            {"input_ids": [9, 10], "attention_mask": [1] * 2, "labels": [IGNORE, 10]}]  # fmt: skip
    for row, nll in zip(rows, module.row_nll(model.eval(), rows, 0)):
        batch = {k: torch.tensor([v]) for k, v in row.items()}
        assert nll == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_refusals(tmp_path: Path):
    classifier = tiny_model("bert", "sequence_classification", 40, hidden_size=16, num_layers=2, num_heads=2)
    with pytest.raises(ConfigError, match="needs a causal language model"):
        generated(tmp_path, classifier)
    reg = SelfReplay(SelfReplayConfig(name="self_replay"))
    with pytest.raises(ConfigError, match="gives train_data none"):
        reg.train_data(rows_of(4), rows_of(4), 0)
    stack = RegularizerStack.from_configs([REGISTRY["self_replay"].config(name="self_replay", prompts="bos")])
    with pytest.raises(ConfigError, match="before setup"):
        stack.setup(SetupContext(model_of()))
    from tether.config import RegularizerEntry
    from tether.regularizers import RunFacts

    with pytest.raises(ConfigError, match="set data.reference, or prompts: bos"):
        parse_entries([RegularizerEntry(name="self_replay")], RunFacts(False, None, 1e-3))
    assert parse_entries([RegularizerEntry(name="self_replay", prompts="bos")], RunFacts(False, None, 1e-3))


def test_train_mixes_generated_rows_and_a_resumed_run_reuses_them(
    raw_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    raw = copy.deepcopy(raw_config)
    raw["training"] = {"learning_rate": 3e-3, "max_steps": 4, "per_device_train_batch_size": 8, "eval_strategy": "no",
                       "save_strategy": "steps", "save_steps": 2}  # fmt: skip
    raw["regularizers"] = [{"name": "self_replay", "ratio": 0.2, "max_new_tokens": 6, "max_perplexity": 1e6}]
    out = tmp_path / "run"
    first = train(validate_config(raw), out)["self_replay"]
    assert first["generated"] == 12 and first["examples"] == 12 and (out / CACHE).is_file()  # 0.2 of 48 + 12
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["reference_roles"]["readers"]["self_replay"]  # it read the held-out reference rows
    (out / "metrics.json").unlink()  # as if killed before the end: the run resumes from its last checkpoint
    calls = counting_samples(monkeypatch)
    resumed = train(validate_config(raw), out, resume=True)["self_replay"]
    assert calls == [] and resumed == first


def test_other_processes_read_the_rows_the_main_one_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    main, _ = generated(tmp_path)
    monkeypatch.setattr(module, "is_main_process", lambda: False)
    monkeypatch.setattr(module, "barrier", lambda: None)
    calls = counting_samples(monkeypatch)
    other, _ = generated(tmp_path)
    assert calls == [] and other == main
    (tmp_path / CACHE).unlink()
    with pytest.raises(TetherError, match="holds 0 of 1 batches"):
        generated(tmp_path)
