"""Forgetting tracked at every evaluation, the choice on target and retention, history and progress during training."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from transformers import TrainerCallback

from tether.config import validate_config
from tether.data import Collator
from tether.progress import RichProgress
from tether.reference import Reference, ReferenceOptions
from tether.run import train
from tether.synthetic import char_tokenizer, tiny_model
from tether.tracking import OUTSIDE, Budget, Probe


def _run(raw: dict[str, Any], out: Path, **kwargs: Any) -> dict[str, Any]:
    return train(validate_config(raw), out, overwrite=True, **kwargs)


def _evals(out: Path) -> list[dict[str, Any]]:
    lines = (out / "history.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "eval_loss" in e]


def test_tracked_measures_equal_the_final_measure(raw_config: dict, tmp_path: Path) -> None:
    raw_config["training"].update(max_steps=20, eval_steps=10)
    metrics = _run(raw_config, tmp_path / "run")
    last = _evals(tmp_path / "run")[-1]
    f = metrics["forgetting"]
    assert last["step"] == 20
    assert last["eval_reference_loss"] == pytest.approx(f["reference_loss_after"], abs=1e-5)
    assert last["eval_forgetting"] == pytest.approx(f["delta_loss"], abs=1e-5)
    assert last["eval_recall"] == pytest.approx(f["recall_after"])
    assert last["eval_probe_kl"] > 0  # the weights moved: the model no longer predicts as the original
    assert metrics["target"]["base_val_loss"] > metrics["target"]["val_loss"]  # it learned: the gain is visible
    assert metrics["wall_time_s"] >= metrics["train_runtime_s"] > 0


def _trained_copy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.nn.Module:
    moved = copy.deepcopy(model)
    opt = torch.optim.SGD(moved.parameters(), lr=0.5)
    for _ in range(3):
        moved(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return moved


def _naive_kl(original: torch.nn.Module, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """KL(original || model) per loss position, from whole logits: sum p (log p - log q)."""
    with torch.no_grad():
        p = original(**batch).logits[:, :-1].log_softmax(-1)
        q = model(**batch).logits[:, :-1].log_softmax(-1)
    mask = batch["labels"][:, 1:] != -100
    per_token = (p.exp() * (p - q)).sum(-1)
    return (per_token[mask].sum() / mask.sum()).item()


def test_probe_kl_equals_the_naive_kl_from_snapshot_and_reference() -> None:
    tok = char_tokenizer()
    model = tiny_model("llama", "causal_lm", tok.vocab_size).eval()
    rows = []
    for i in range(10):
        ids = tok(f"{i}+{i}={2 * i}")["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 4 + ids[4:]})
    collator = Collator(tok.pad_token_id)
    whole = collator(rows)
    snapshot = Probe.build(model, rows, collator, None, 2**30)
    reference = Probe.build(model, rows, collator, Reference.build(model, ReferenceOptions()), 2**30)
    original = copy.deepcopy(model)
    trained = _trained_copy(model, whole)
    model.load_state_dict(trained.state_dict())  # the reference's frozen copy stays the original
    expected = _naive_kl(original, model, whole)
    assert expected > 1e-3
    assert snapshot.kl(model) == pytest.approx(expected, rel=1e-4)
    assert reference.kl(model) == pytest.approx(expected, rel=1e-4)
    assert snapshot.kl(original) == pytest.approx(0, abs=1e-6)


def test_probe_under_lora_compares_with_the_adapters_off() -> None:
    from peft import LoraConfig, get_peft_model

    tok = char_tokenizer()
    model = get_peft_model(
        tiny_model("llama", "causal_lm", tok.vocab_size), LoraConfig(r=4, target_modules="all-linear")
    )
    ids = tok("21+21=42")["input_ids"]
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * 6 + ids[6:]}] * 3
    collator = Collator(tok.pad_token_id)
    probe = Probe.build(model, rows, collator, None, 2**30)
    assert probe.reference is not None and probe.reference.mode == "disable" and probe.snapshot is None
    assert probe.kl(model) == pytest.approx(0, abs=1e-7)  # a fresh adapter adds zero
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    batch = collator(rows)
    model.eval()
    with model.disable_adapter():
        original = copy.deepcopy(model.get_base_model())
    expected = _naive_kl(original, model, batch)
    assert expected > 1e-3 and probe.kl(model) == pytest.approx(expected, rel=1e-4)


def test_probe_snapshot_keeps_the_rows_that_fit() -> None:
    tok = char_tokenizer()
    model = tiny_model("llama", "causal_lm", tok.vocab_size)
    ids = tok("12+30=42")["input_ids"]
    row = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
    one_row = (len(ids) - 1) * tok.vocab_size * 4
    probe = Probe.build(model, [row] * 5, Collator(tok.pad_token_id), None, 2 * one_row)
    assert sum(len(b["input_ids"]) for b in probe.batches) == 2
    assert sum(len(s) for s in probe.snapshot) == 2 * (len(ids) - 1)


def test_budget_rule() -> None:
    rule = Budget("eval_loss", False, "probe_kl", 0.1)
    assert rule.choice({"eval_loss": 2.0, "eval_probe_kl": 0.05}) == {"eval_within_budget": 1.0, "eval_choice": 2.0}
    over = rule.choice({"eval_loss": 1.0, "eval_probe_kl": 0.3})
    assert over["eval_within_budget"] == 0.0 and over["eval_choice"] == OUTSIDE + 0.3  # worse than any within
    assert Budget("accuracy", True, "delta_loss", 0.1).choice({"eval_accuracy": 0.9, "eval_forgetting": 0.2}) == {
        "eval_within_budget": 0.0, "eval_choice": -(OUTSIDE + 0.2)
    }  # fmt: skip


def test_forgetting_budget_restores_the_best_evaluation_within_it(raw_config: dict, tmp_path: Path) -> None:
    raw_config["training"].update(max_steps=20, eval_steps=5)
    raw_config["early_stopping"] = {"patience": 10}
    free = _run(raw_config, tmp_path / "free")
    evals = _evals(tmp_path / "free")
    kls = [e["eval_probe_kl"] for e in evals]
    assert kls == sorted(kls) and free["best_step"] == 20  # the KL grows as the target loss falls
    budget = (kls[1] + kls[2]) / 2  # steps 5 and 10 are within, 15 and 20 are not
    raw_config["early_stopping"].update(forgetting_budget=budget, forgetting_measure="probe_kl")
    bound = _run(raw_config, tmp_path / "bound")
    chosen = _evals(tmp_path / "bound")
    assert [e["eval_within_budget"] for e in chosen] == [1.0, 1.0, 0.0, 0.0]
    assert bound["best_step"] == 10
    assert bound["target"]["val_loss"] == pytest.approx(chosen[1]["eval_loss"], abs=1e-5)  # the restored model
    assert bound["target"]["val_loss"] > free["target"]["val_loss"]
    assert bound["forgetting_budget"] == {
        "limit": budget, "measure": "probe_kl", "evaluations": 4, "within": 2,
        "target_only": {"step": 20, "eval_loss": chosen[3]["eval_loss"], "forgetting": chosen[3]["eval_probe_kl"]},
    }  # fmt: skip


def test_budget_on_the_reference_loss_needs_reference_data(raw_config: dict) -> None:
    raw_config["data"].pop("reference")
    raw_config["early_stopping"] = {"forgetting_budget": 0.1}
    with pytest.raises(Exception, match="forgetting_measure: probe_kl"):
        validate_config(raw_config)


class _ReadHistory(TrainerCallback):
    """Reads history.jsonl from disk after step 11, while training runs."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen, self.log = path, None, None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 11:
            self.seen = [json.loads(line) for line in self.path.read_text().splitlines()]
            self.log = copy.deepcopy(state.log_history)


def test_history_grows_during_training_and_progress_prints_plain_lines(raw_config: dict, tmp_path: Path) -> None:
    raw_config["training"].update(max_steps=20, eval_steps=5, logging_steps=5)
    reader = _ReadHistory(tmp_path / "run" / "history.jsonl")
    out = io.StringIO()
    console = Console(file=out, width=200)  # a file, not a terminal: plain lines
    _run(raw_config, tmp_path / "run", callbacks=[reader, RichProgress("training", console)])
    assert reader.seen == reader.log and len(reader.seen) == 4  # steps 5 and 10: a loss and an evaluation each
    lines = out.getvalue().splitlines()
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    losses = [h for h in history if "loss" in h]
    shown = [h for h in history if "loss" in h or "eval_loss" in h]  # not the Trainer's closing summary
    assert [line.split(":")[0] for line in lines].count("training") == len(shown) == len(history) - 1
    assert f"step 5/20 (25%) loss {losses[0]['loss']:.4g}" in lines[0]


def test_plain_lines_report_the_pace_since_a_resume() -> None:
    from tether.progress import plain_line

    class State:
        global_step, max_steps = 60, 100

    import time

    line = plain_line("training", State(), {"loss": 1.5}, time.perf_counter() - 10, first_step=40)
    assert line.startswith("training: step 60/100 (60%) loss 1.5 | 10s elapsed, ~20s left")


def test_tracked_measures_reach_tensorboard_and_the_report(raw_config: dict, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_report import Page, png_size

    raw_config["training"].update(max_steps=10, eval_steps=5, report_to=["tensorboard"])
    _run(raw_config, tmp_path / "run")
    evals = _evals(tmp_path / "run")
    (logdir,) = (tmp_path / "run" / "runs").iterdir()
    events = EventAccumulator(str(logdir))
    events.Reload()
    for key in ("forgetting", "probe_kl", "reference_loss", "recall"):
        got = [(s.step, s.value) for s in events.Scalars(f"eval/{key}")]
        assert got == [(e["step"], pytest.approx(e[f"eval_{key}"], rel=1e-6)) for e in evals]
    doc = Page((tmp_path / "run" / "report.html").read_text())
    assert "Forgetting during training" in doc.headings
    table = next(t for t in doc.tables if t[0][:2] == ["step", "eval_loss"])
    header, *rows = table
    assert [r[header.index("eval_probe_kl")] for r in rows] == [f"{e['eval_probe_kl']:.4g}" for e in evals]
    assert any("forgetting during training" in img["alt"] and min(png_size(img["src"])) > 50 for img in doc.images)


def test_lm_eval_scores_are_sweep_objectives(raw_config: dict) -> None:
    from tether.config import SWEEP_METRICS
    from tether.harness.sweep.objective import flat_metrics

    raw_config["sweep"] = {
        "params": {"training.learning_rate": {"distribution": "log_uniform", "low": 1e-3, "high": 3e-3}},
        "objectives": ["target.val_loss", "lm_eval.tether_facts.acc.delta"],
    }
    with pytest.raises(Exception, match="list tether_facts in its tasks"):
        validate_config(raw_config)
    raw_config["evaluation"] = {"lm_eval": {"tasks": ["tether_facts"]}}
    assert validate_config(raw_config).sweep.objectives[1] == "lm_eval.tether_facts.acc.delta"
    assert SWEEP_METRICS["lm_eval.tether_facts.acc.delta"] == "maximize"
    assert SWEEP_METRICS["lm_eval.wikitext.word_perplexity.after"] == "minimize"
    metrics = {"target": {"val_loss": 1.5}, "lm_eval": {"tether_facts": {"acc": {"before": 0.5, "after": 0.25,
                                                                                "delta": -0.25}}}}  # fmt: skip
    assert flat_metrics(metrics) == {
        "target.val_loss": 1.5, "lm_eval.tether_facts.acc.after": 0.25, "lm_eval.tether_facts.acc.delta": -0.25
    }  # fmt: skip


def test_base_val_loss_is_the_untrained_models(raw_config: dict, tmp_path: Path) -> None:
    from tether.data import load_datasets
    from tether.evaluate import dataset_metrics
    from tether.models import load_model

    raw_config["training"].update(max_steps=2, eval_steps=2)
    metrics = _run(raw_config, tmp_path / "run")
    cfg = validate_config(raw_config)
    model, tokenizer, _ = load_model(cfg.model, cfg.task)
    data = load_datasets(cfg.data, cfg.task, tokenizer)
    expected = dataset_metrics(model, data.validation.encoded, Collator(tokenizer.pad_token_id))["loss"]
    assert metrics["target"]["base_val_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("launch", ["fsdp", "deepspeed"])
def test_tracking_starts_under_fsdp_and_is_said_off_under_deepspeed(raw_config: dict, launch: str, caplog) -> None:
    """Under FSDP every process measures at each evaluation (tests/test_multiprocess.py measures sharded models
    against one process); DeepSpeed is untested, so it is off there and the log says so."""
    from types import SimpleNamespace

    from tether.data import load_datasets
    from tether.tracking import RunLog, start_tracking

    cfg = validate_config(raw_config)
    tokenizer = char_tokenizer()
    data = load_datasets(cfg.data, cfg.task, tokenizer)
    model = tiny_model("llama", "causal_lm", len(tokenizer), hidden_size=32, num_layers=2, num_heads=4)
    run_log = RunLog(None)
    trainer = SimpleNamespace(
        callback_handler=SimpleNamespace(callbacks=[run_log]), model=model, stack=SimpleNamespace(reference=None),
        is_fsdp_enabled=launch == "fsdp", is_deepspeed_enabled=launch == "deepspeed",
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="tether.tracking"):
        start_tracking(run_log, cfg, trainer, tokenizer, Collator(tokenizer.pad_token_id), data, {"loss": 1.0})
    if launch == "fsdp":
        assert run_log.model is model and run_log.probe is not None and not caplog.records
    else:
        assert run_log.model is None and "not tracked during training under DeepSpeed" in caplog.text


def test_an_evaluation_worse_than_the_base_model_is_warned_of_once(raw_config: dict, tmp_path: Path, caplog) -> None:
    """A falling training loss can hide a task getting worse than before training (dft's reweighted loss, a learning
    rate too high): the log says so at the first such evaluation, and only then."""
    raw_config["training"].update(learning_rate=0.5, max_steps=6, eval_steps=2)
    with caplog.at_level("WARNING", logger="tether.tracking"):
        metrics = _run(raw_config, tmp_path / "high")
    worse = [r.getMessage() for r in caplog.records if "above the base model's" in r.getMessage()]
    assert metrics["target"]["val_loss"] > 1.05 * metrics["target"]["base_val_loss"]
    assert len(worse) == 1 and worse[0].startswith("eval_loss ") and "at step 2 " in worse[0], worse
    caplog.clear()
    raw_config["training"].update(learning_rate=3e-3)
    with caplog.at_level("WARNING", logger="tether.tracking"):
        metrics = _run(raw_config, tmp_path / "fine")
    assert metrics["target"]["val_loss"] < metrics["target"]["base_val_loss"]
    assert not [r for r in caplog.records if "above the base model's" in r.getMessage()]


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_smoothed_eval_loss_is_not_compared_with_the_base_models(raw_config: dict, tmp_path: Path, monkeypatch,
                                                                    smoothing: float) -> None:  # fmt: skip
    """Under training.label_smoothing_factor the Trainer's eval_loss is smoothed, the base's is not: no warning
    then (it fired on an unchanged model's plain loss)."""
    import tether.tracking

    given: list[float | None] = []
    init = tether.tracking.RunLog.__init__
    monkeypatch.setattr(tether.tracking.RunLog, "__init__", lambda self, *a: given.append(a[2]) or init(self, *a))
    raw_config["training"].update(max_steps=2, eval_steps=2, label_smoothing_factor=smoothing)
    metrics = _run(raw_config, tmp_path / "run")
    assert given == ([None] if smoothing else [metrics["target"]["base_val_loss"]])


def test_lm_eval_failing_at_an_evaluation_is_raised_not_waited_on(monkeypatch) -> None:
    """The main process scores alone and shares the outcome: a failure is raised (on the other processes as one
    line naming it), never left for them to wait on."""
    import tether.lmeval
    from tether.config import LmEvalConfig
    from tether.errors import ConfigError
    from tether.tracking import RunLog

    def broken(*args: Any) -> dict:
        raise ConfigError("evaluation.lm_eval.tasks: nope not found")

    monkeypatch.setattr(tether.lmeval, "scores", broken)
    run_log = RunLog(None)
    run_log.lm_eval = LmEvalConfig(tasks=["nope"], at_evaluations=True)
    with pytest.raises(ConfigError, match="nope not found"):
        run_log.lm_eval_logs(torch.nn.Linear(1, 1))
    monkeypatch.setattr(tether.lmeval, "scores", lambda *a: {"t": {"acc": 0.5}})
    assert run_log.lm_eval_logs(torch.nn.Linear(1, 1)) == {"eval_lm_eval/t/acc": 0.5}
