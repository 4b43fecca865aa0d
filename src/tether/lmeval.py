"""lm-evaluation-harness on the base model and on the result, in memory and offline; and tether's own task pack.

`evaluation.lm_eval: {tasks, include_path, limit, num_fewshot}` runs lm_eval.simple_evaluate on the model object
itself (lm_eval's HFLM(pretrained=model, tokenizer=...)): once on the base model before training (before LoRA is
applied, so adapters play no part) and once on the result. Nothing is fetched: the tasks come from `include_path`
(task YAML files over local data: `dataset_path: json` with data_files) or lm-eval's own registry, and the datasets
library is run offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set for the call). Every numeric metric of each
task goes to metrics.json as lm_eval.<task>.<metric>.{before, after, delta} (stderr entries left out).

The task pack: write_task_pack(directory) turns a prompt/completion fact set (by default the demo world's facts)
into a multiple-choice task `tether_facts`: the prompt, the true completion and three other completions of the same
set, scored by lm-eval's log-likelihood of each choice. The YAML is written next to the data with its absolute path
(lm-eval reads data_files relative to the working directory, not to the YAML). `python -m tether.lmeval DIR` does the
same from the command line.
"""

from __future__ import annotations

import json
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tether.config import LmEvalConfig
from tether.errors import ConfigError
from tether.outputs import write_text_atomic

TASK_NAME = "tether_facts"
DISTRACTORS = 3
TASK_YAML = """\
# tether's task pack: a prompt/completion fact set as multiple choice (python -m tether.lmeval DIR writes it)
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def multiple_choice_rows(facts: list[dict[str, str]], seed: int = 0) -> list[dict[str, Any]]:
    """Each fact as {prompt, choices, gold}: its completion among DISTRACTORS other completions of the set."""
    answers = sorted({f["completion"] for f in facts})
    if len(answers) <= DISTRACTORS:
        raise ValueError(f"the fact set has {len(answers)} distinct completions: a choice of 4 needs at least 4")
    rng = random.Random(seed)
    rows = []
    for fact in facts:
        others = rng.sample([a for a in answers if a != fact["completion"]], DISTRACTORS)
        choices = [fact["completion"], *others]
        rng.shuffle(choices)
        rows.append({"prompt": fact["prompt"], "choices": choices, "gold": choices.index(fact["completion"])})
    return rows


def write_task_pack(directory: Path, facts: list[dict[str, str]] | None = None, seed: int = 0) -> Path:
    """Write the tether_facts task (YAML + JSONL) under directory/tether_facts/; returns the directory to pass as
    include_path. facts: prompt/completion rows; None: the demo world's facts (tether.synthetic, seed `seed`)."""
    if facts is None:
        from tether.synthetic import BASE_SETTINGS, make_world

        facts = make_world(seed, BASE_SETTINGS["n_facts"]).facts
    folder = Path(directory).resolve() / TASK_NAME
    data = folder / f"{TASK_NAME}.jsonl"
    write_text_atomic(data, "".join(json.dumps(r) + "\n" for r in multiple_choice_rows(facts, seed)))
    write_text_atomic(folder / f"{TASK_NAME}.yaml", TASK_YAML.format(name=TASK_NAME, data=json.dumps(str(data))))
    return Path(directory).resolve()


@contextmanager
def offline() -> Any:
    """HF_DATASETS_OFFLINE and HF_HUB_OFFLINE set inside (restored after): lm-eval must read local files only."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scores(model: nn.Module, tokenizer: Any, cfg: LmEvalConfig) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm_eval.simple_evaluate on the in-memory model (eval mode; restored after)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "evaluation.lm_eval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.8,<0.5'"
        ) from None
    if cfg.include_path is not None and not Path(cfg.include_path).is_dir():
        raise ConfigError(f"evaluation.lm_eval.include_path: {cfg.include_path} is not a directory: fix the path")
    was_training = model.training
    model.eval()
    try:
        with offline():
            manager = _task_manager(TaskManager, cfg)
            unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
            if unknown:
                where = f" in {cfg.include_path} or" if cfg.include_path else ""
                raise ConfigError(
                    f"evaluation.lm_eval.tasks: {', '.join(unknown)} not found{where} in lm-eval's tasks"
                )
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            out = simple_evaluate(
                model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                task_manager=manager, log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                torch_random_seed=0, fewshot_random_seed=0,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return {task: _numbers(values) for task, values in out["results"].items()}


def _task_manager(manager: Any, cfg: LmEvalConfig) -> Any:
    """lm-eval's TaskManager over include_path alone when it holds every task (indexing lm-eval's own ~15k task
    files takes seconds), else over include_path and lm-eval's tasks."""
    if cfg.include_path is not None:
        own = manager(include_path=cfg.include_path, include_defaults=False)
        if all(t in own.all_tasks for t in cfg.tasks):
            return own
    return manager(include_path=cfg.include_path)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's per-task results without the alias and stderr: {"acc": 0.5} from {"acc,none": 0.5, ...}."""
    out = {}
    for key, value in values.items():
        metric, has_filter, filt = key.partition(",")  # metrics are "name,filter"; alias, sample_len are not
        if has_filter and isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric:
            out[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


def compare(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, Any]:
    """metrics.json lm_eval: {task: {metric: {before, after, delta}}}."""
    return {
        task: {m: {"before": before[task][m], "after": v, "delta": v - before[task][m]}
               for m, v in after[task].items() if m in before.get(task, {})}
        for task in after
    }  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tether.lmeval DIR   (writes the tether_facts task pack under DIR)", file=sys.stderr)
        return 2
    path = write_task_pack(Path(argv[0]))
    print(f"wrote {path / TASK_NAME}: use evaluation.lm_eval: {{tasks: [{TASK_NAME}], include_path: {path}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
