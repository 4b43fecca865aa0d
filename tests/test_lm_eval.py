"""lm-evaluation-harness on tether's own task pack, offline: its accuracy is the log-likelihood choice of the model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval")

from tether.config import LmEvalConfig, validate_config
from tether.lmeval import TASK_NAME, multiple_choice_rows, offline, scores, write_task_pack
from tether.run import train
from tether.synthetic import char_tokenizer, tiny_model

FACTS = [{"prompt": f"The color of item {i} is", "completion": f" c{i % 5}."} for i in range(12)]


@torch.no_grad()
def choice_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """The share of rows whose highest summed log-probability choice (given the prompt) is the gold one."""
    model.eval()
    hits = 0
    for row in rows:
        context = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        totals = []
        for choice in row["choices"]:
            ids = tokenizer(row["prompt"] + choice, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
            totals.append(sum(logp[t - 1, ids[t]].item() for t in range(len(context), len(ids))))
        hits += max(range(len(totals)), key=totals.__getitem__) == row["gold"]
    return hits / len(rows)


def test_task_pack_rows_hold_the_fact_among_other_answers() -> None:
    rows = multiple_choice_rows(FACTS, seed=0)
    assert [r["choices"][r["gold"]] for r in rows] == [f["completion"] for f in FACTS]
    assert all(len(set(r["choices"])) == 4 and set(r["choices"]) <= {f["completion"] for f in FACTS} for r in rows)


def test_lm_eval_offline_on_the_pack_equals_the_log_likelihood_choice(tmp_path: Path) -> None:
    tok = char_tokenizer()
    model = tiny_model("llama", "causal_lm", tok.vocab_size, seed=3)
    pack = write_task_pack(tmp_path / "tasks", FACTS)
    rows = [json.loads(line) for line in (pack / TASK_NAME / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    got = scores(model, tok, LmEvalConfig(tasks=[TASK_NAME], include_path=str(pack)))
    assert {k: os.environ.get(k) for k in before} == before  # offline only inside the call
    assert got[TASK_NAME]["acc"] == pytest.approx(choice_accuracy(model, tok, rows))
    limited = scores(model, tok, LmEvalConfig(tasks=[TASK_NAME], include_path=str(pack), limit=4))
    assert limited[TASK_NAME]["acc"] == pytest.approx(choice_accuracy(model, tok, rows[:4]))


@pytest.mark.slow  # the unknown name makes lm-eval index its ~15k task files (8 s)
def test_unknown_task_is_one_line(tmp_path: Path) -> None:
    from tether.errors import ConfigError

    tok = char_tokenizer()
    pack = write_task_pack(tmp_path / "tasks", FACTS)
    with offline(), pytest.raises(ConfigError, match="tether_fact not found"):
        scores(tiny_model("llama", "causal_lm", tok.vocab_size), tok, LmEvalConfig(tasks=["tether_fact"],
               include_path=str(pack)))  # fmt: skip


def test_a_run_scores_the_base_and_the_result(raw_config: dict, tmp_path: Path) -> None:
    from peft import PeftModel

    pack = write_task_pack(tmp_path / "tasks", FACTS)
    rows = [json.loads(line) for line in (pack / TASK_NAME / f"{TASK_NAME}.jsonl").read_text().splitlines()]
    raw_config["training"].update(max_steps=10, eval_steps=10)
    raw_config["lora"] = {"r": 4}  # "before" is the base without adapters
    raw_config["evaluation"] = {"lm_eval": {"tasks": [TASK_NAME], "include_path": str(pack), "at_evaluations": True}}
    metrics = train(validate_config(raw_config), tmp_path / "run", overwrite=True)
    acc = metrics["lm_eval"][TASK_NAME]["acc"]
    tok = char_tokenizer()
    base = tiny_model("llama", "causal_lm", tok.vocab_size)  # the config's synthetic model: seed 0
    assert acc["before"] == pytest.approx(choice_accuracy(base, tok, rows))
    result = PeftModel.from_pretrained(base, str(tmp_path / "run" / "model"))
    assert acc["after"] == pytest.approx(choice_accuracy(result, tok, rows))
    assert acc["delta"] == pytest.approx(acc["after"] - acc["before"])
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    (last,) = [e for e in history if "eval_loss" in e]  # one evaluation, at the last step: the result's score
    assert last[f"eval_lm_eval/{TASK_NAME}/acc"] == pytest.approx(acc["after"])
    assert "lm-evaluation-harness" in (tmp_path / "run" / "report.html").read_text()


def test_tether_eval_scores_the_saved_model_on_the_configured_tasks(raw_config: dict, tmp_path: Path) -> None:
    """`tether eval` of a run configured with evaluation.lm_eval gives the saved model's scores (it ignored them)."""
    from tether.run import evaluate_saved

    pack = write_task_pack(tmp_path / "tasks", FACTS)
    raw_config["training"].update(max_steps=4, eval_steps=4)
    raw_config["evaluation"] = {"lm_eval": {"tasks": [TASK_NAME], "include_path": str(pack)}}
    cfg = validate_config(raw_config)
    metrics = train(cfg, tmp_path / "run", overwrite=True)
    scored = evaluate_saved(cfg, tmp_path / "run" / "model")
    assert scored["lm_eval"][TASK_NAME]["acc"] == pytest.approx(metrics["lm_eval"][TASK_NAME]["acc"]["after"])
