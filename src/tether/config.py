"""Run config: YAML -> overrides -> validated, frozen pydantic models. Errors name the field and what to change."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, StrictInt, ValidationError, field_validator, model_validator

from tether.errors import ConfigError
from tether.regularizers import RunFacts, parse_entries
from tether.section import RegularizerEntry, Section


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: YAML 1.1 reads `1e-4` as a string and `no` / `on` as booleans (`eval_strategy: no`)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class SyntheticModelConfig(Section):
    arch: str = "llama"
    """Architecture of the random-init tiny model: llama, mistral, qwen2, gemma, gpt2, gpt_neox, phi, bert, roberta."""
    hidden_size: int = Field(32, ge=8)
    """Width of the model; 32 keeps tests fast."""
    num_layers: int = Field(2, ge=1)
    """Number of transformer blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention heads; must divide hidden_size."""
    seed: int = 0
    """Seed of the random initialization."""


class ModelConfig(Section):
    path: str | None = None
    """Local directory or hub id of the pre-trained model (HF `from_pretrained`)."""
    synthetic: SyntheticModelConfig | None = None
    """Build a tiny random-init model in code instead of loading one (tests, demo, benchmarks)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its source."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in."""
    num_labels: int | None = Field(None, ge=2)
    """Number of classes for task sequence_classification; unset: read from the data (the distinct names, or the
    largest class id + 1). Set it when some class has no row yet."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of model.path (a directory or hub id) and model.synthetic")
        return self


class DataConfig(Section):
    train: str
    """Training data: a JSONL file, a directory saved with `datasets.save_to_disk`, or a hub dataset id."""
    validation: str | None = None
    """Validation data (same forms as train). If unset, `validation_fraction` of train is split off."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of train held out for validation when no validation file is given."""
    reference: str | None = None
    """General data the model must not forget (e.g. a fact set). Measured before and after; used by EWC, replay."""
    format: Literal["text", "prompt_completion", "chat"] = "prompt_completion"
    """Row format: text {text}; prompt_completion {prompt, completion} with the loss on the completion only;
    chat {messages} through the tokenizer's chat template, the loss on the assistant turns (chat_loss).
    For task sequence_classification rows are {text, label} (a class id from 0, or a class name) and format
    must be text."""
    reference_format: Literal["text", "prompt_completion", "chat"] | None = None
    """Format of the reference data; defaults to `format`. prompt_completion reference data also gets fact recall."""
    max_length: int = Field(256, ge=8)
    """Tokens per example. A longer text row is split into windows (none of it is lost); prompt_completion, chat
    and classification rows are cut. What was split or cut is counted and printed before training."""
    window_overlap: int = Field(0, ge=0)
    """Tokens each window of a long text row repeats from the one before, as context without loss (every token
    still carries loss once); 0: windows follow each other, and a window's first token is predicted from nothing."""
    packing: bool = False
    """causal_lm: pack short training examples together into max_length tokens (fewer padding tokens, faster
    steps); attention stays inside each example (restarting position_ids, as transformers'
    DataCollatorWithFlattening) and loss masks are kept. Evaluation runs unpacked."""
    chat_loss: Literal["all", "last"] = "all"
    """format chat: the loss on every assistant turn (all) or on the last one only (last)."""
    seed: int = 0
    """Seed of the validation split."""

    @model_validator(mode="after")
    def _windows_advance(self) -> DataConfig:
        if self.window_overlap >= self.max_length // 2:
            raise ValueError(f"window_overlap must be less than half of max_length ({self.max_length})")
        return self


class LoraSection(Section):
    r: int = Field(8, ge=1)
    """Rank of the adapter; 8-16 is typical for small data."""
    alpha: float = Field(16.0, gt=0)
    """Scale of the adapter update (alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """lora_dropout on the adapter input: 0.05-0.1 for small data."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt, or all-linear."""
    init: Literal["default", "corda_kpm", "corda_ipm"] = "default"
    """How the adapter starts. default: B = 0 (PEFT's LoRA). corda_kpm: CorDA's knowledge-preserved mode
    (arXiv 2406.05223): each adapter takes the directions of its weight that the reference data use least, measured
    on data.reference's held-out rows (evaluation.reference_holdout), and the base keeps the rest; corda_ipm: the
    directions the training rows use most (faster learning, no preservation). The model's outputs are unchanged at
    the start either way (PEFT moves the adapter's part out of the base weight)."""
    calibration_rows: int = Field(256, ge=1)
    """CorDA: at most this many rows run through the model, one at a time, to build each layer's input covariance
    (about hidden_size / tokens_per_row * 128 rows suffice)."""


class OsfSection(Section):
    effective_rank: StrictInt | float = 0.5
    """How much of each adapted weight stays frozen: its top singular directions, as a fraction of the weight's
    smaller dimension in (0, 1) (0.5: half) or as a count (an integer, e.g. 64). The remaining directions train
    (min(out, in) - effective_rank of them, an adapter about as big as the weight), their gradients projected off the
    frozen ones. Higher keeps more of what the model knew and learns less."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (nn.Linear layers: PEFT's OSF adapts no other kind), or all-linear."""

    @field_validator("effective_rank")
    @classmethod
    def _rank(cls, value: float) -> float:
        if isinstance(value, int) and value < 1:
            raise ValueError("a count of frozen directions must be 1 or more")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a fraction lies in (0, 1) (1.0 would freeze every direction; a count is an integer)")
        return value


class EarlyStoppingConfig(Section):
    metric: str = "eval_loss"
    """Metric watched at each evaluation (a key of the Trainer's eval logs)."""
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before stopping."""
    threshold: float = Field(0.0, ge=0)
    """Minimum improvement that counts."""
    mode: Literal["min", "max"] = "min"
    """Whether lower (loss) or higher (accuracy) is better."""
    forgetting_budget: float | None = Field(None, ge=0)
    """Choose on target and retention: only evaluations whose forgetting (`forgetting_measure`) is at most this count
    as improvements; the best checkpoint is the best `metric` among them (none within: the least forgetting).
    None: the metric alone."""
    forgetting_measure: Literal["delta_loss", "probe_kl"] = "delta_loss"
    """What the budget bounds: delta_loss, the measured reference loss minus the base model's (needs data.reference);
    probe_kl, KL(original || model) per token on a fixed probe of training rows (needs no reference data)."""


class LmEvalConfig(Section):
    """lm-evaluation-harness tasks run on the base model and on the result (`pip install tether[lm_eval]`)."""

    tasks: list[str] = Field(min_length=1)
    """Task or group names, e.g. [tether_facts] (the shipped pack) or [arc_easy, hellaswag] from include_path."""
    include_path: str | None = None
    """A directory of task YAML files (local copies of standard suites: `dataset_path: json` + data_files)."""
    limit: int | None = Field(None, ge=1)
    """At most this many documents per task (a quick, noisier score)."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per prompt; None: each task's own default."""
    batch_size: int = Field(8, ge=1)
    """Requests per forward."""
    at_evaluations: bool = False
    """Also score the tasks at every evaluation during training (history.jsonl eval_lm_eval/<task>/<metric>,
    TensorBoard eval/lm_eval/...): each evaluation then costs a whole lm-eval run."""


class EvaluationConfig(Section):
    """How forgetting is measured: which reference rows are measured, tracking during training, lm-eval."""

    reference_holdout: float | None = Field(None, gt=0, lt=1)
    """Share of data.reference held out of the measurement for the regularizers that read it without data of their
    own (replay without source, ewc without data, si); seeded by data.seed. None: 0.5 when such a regularizer is
    configured, else every row is measured. Set it in runs you compare, so that each measures the same rows."""
    train_on_measured: bool = False
    """Let those regularizers use every row of data.reference, the measured ones included. The forgetting then
    flatters them: metrics.json (reference_roles.trained_on_measured) and the report say so."""
    track: bool = True
    """At every evaluation, measure the reference loss (and recall), and the KL to the original on a probe."""
    probe_rows: int = Field(32, ge=0)
    """Training rows (the first ones) of the KL probe; 0: no probe."""
    probe_mb: int = Field(256, ge=1)
    """Host memory for the original's logits on the probe (full fine-tuning without distill/kl): rows are dropped
    from the probe until they fit."""
    lm_eval: LmEvalConfig | None = None
    """lm-evaluation-harness tasks, scored on the base model and on the result."""


class MetricDirections(dict):
    """metrics.json keys a sweep can use -> the way each is better. Besides the fixed keys, the lm-eval scores of a
    run with evaluation.lm_eval: lm_eval.<task>.<metric>.after / .delta, better up except perplexities and bits."""

    def __missing__(self, name: str) -> Literal["minimize", "maximize"]:
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "lm_eval" or parts[-1] not in ("after", "delta"):
            raise KeyError(name)
        return "minimize" if parts[-2] in LOWER_IS_BETTER or parts[-2].endswith("perplexity") else "maximize"

    def __contains__(self, name: object) -> bool:
        try:
            self[name]
        except (KeyError, TypeError):
            return False
        return True


LOWER_IS_BETTER = ("bits_per_byte", "ter")  # lm-eval metrics where lower is better (with the *perplexity ones)


def lm_eval_names(metrics: dict[str, Any]) -> list[str]:
    """The lm_eval.<task>.<metric>.after / .delta keys of a metrics.json-shaped dict."""
    scores = metrics.get("lm_eval") or {}
    return [f"lm_eval.{task}.{m}.{k}" for task, ms in scores.items() for m in ms for k in ("after", "delta")]


SWEEP_METRICS: dict[str, Literal["minimize", "maximize"]] = MetricDirections(
    {  # metrics.json keys -> better way
        "target.val_loss": "minimize",
        "target.train_loss": "minimize",
        "target.accuracy": "maximize",
        "target.f1": "maximize",
        "overfit_gap": "minimize",
        "forgetting.delta_loss": "minimize",
        "forgetting.reference_loss_after": "minimize",
        "forgetting.recall_after": "maximize",
        "forgetting.recall_drop": "minimize",
    }
)


def _known_metric(name: str) -> str:
    if name not in SWEEP_METRICS:
        raise ValueError(
            f"unknown metric: use one of {', '.join(SWEEP_METRICS)}, or lm_eval.<task>.<metric>.after/delta"
        )
    return name


SweepMetric = Annotated[str, AfterValidator(_known_metric)]


class SweepParam(Section):
    distribution: Literal["log_uniform", "uniform", "int", "categorical"]
    """log_uniform for strengths and learning rates (orders of magnitude), uniform for shares and
    probabilities, int for counts (LoRA r), categorical for choices."""
    low: float | None = None
    """Smallest value (log_uniform, uniform, int)."""
    high: float | None = None
    """Largest value (log_uniform, uniform, int)."""
    choices: list[bool | int | float | str] | None = None
    """The values to choose from (categorical)."""

    @model_validator(mode="after")
    def _range(self) -> SweepParam:
        if self.distribution == "categorical":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("categorical takes a non-empty choices list and no low/high")
            return self
        if self.choices is not None or self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.distribution} takes low < high and no choices")
        if self.distribution == "log_uniform" and self.low <= 0:
            raise ValueError("log_uniform needs low > 0 (use uniform for ranges that include 0)")
        if self.distribution == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("int takes whole numbers for low and high")
        return self

    def samples(self) -> list[Any]:
        """Values that must all give a valid run config: the ends of the range, or every choice."""
        if self.choices is not None:
            return list(self.choices)
        ends = [self.low, self.high]
        return [int(v) for v in ends] if self.distribution == "int" else ends


class SweepConstraint(Section):
    metric: SweepMetric
    """A metrics.json key (see sweep.objectives for the names)."""
    max: float | None = None
    """Trials above this value are infeasible: never on the Pareto front, never chosen."""
    min: float | None = None
    """Trials below this value are infeasible."""

    @model_validator(mode="after")
    def _bound(self) -> SweepConstraint:
        if self.max is None and self.min is None:
            raise ValueError("give max or min (or both)")
        return self


class SweepConfig(Section):
    """`tether sweep`: an Optuna study over config values; ignored by `tether train`."""

    params: dict[str, SweepParam] = Field(min_length=1)
    """The values to search, by the dotted paths of --set (regularizers.0.strength, training.learning_rate)."""
    trials: int = Field(20, ge=1)
    """Trials to finish (completed or pruned); --trials overrides it, a re-run resumes until there are this many."""
    objectives: list[SweepMetric] = Field(
        default_factory=lambda: ["target.val_loss", "forgetting.delta_loss"], min_length=1
    )
    """metrics.json keys to optimize, each the way it is better (losses, gap, recall_drop down; accuracy, f1,
    recall_after up): target.val_loss, target.train_loss, target.accuracy, target.f1, overfit_gap,
    forgetting.delta_loss, forgetting.reference_loss_after, forgetting.recall_after, forgetting.recall_drop."""
    constraints: list[SweepConstraint] = Field(default_factory=list)
    """Bounds on metrics, e.g. {metric: forgetting.recall_drop, max: 0.1}."""
    choose: Literal["least_forgetting", "best_target"] = "least_forgetting"
    """Which feasible model to pick: least_forgetting, the best on the second objective among those within
    `tolerance` of the best first objective; best_target, the best on the first (the rule with one objective)."""
    tolerance: float = Field(0.05, ge=0)
    """least_forgetting: how much worse than the best first objective is acceptable, relative (0.05: 5%)."""
    stale_after_s: int = Field(120, ge=2)
    """A running trial whose worker gave no sign of life for this long (killed, machine lost) is marked failed
    and re-run with the same values, resuming from its last checkpoint. Workers signal every quarter of it."""

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("a metric is listed twice")
        return value

    @model_validator(mode="after")
    def _target_first(self) -> SweepConfig:
        """least_forgetting reads the objectives by position: a forgetting metric listed first would make the
        tolerance band one of forgetting and the choice the best target within it, the rule reversed."""
        first = self.objectives[0]
        if self.choose == "least_forgetting" and len(self.objectives) > 1 and not first.startswith("target."):
            raise ValueError(
                f"choose least_forgetting takes the first objective as the target metric, and {first} is not one: "
                "list the target metric (target.val_loss, ...) first, or set choose: best_target"
            )
        return self


CLASSIFICATION_METRICS = ("eval_accuracy", "eval_f1", "accuracy", "f1")  # early stopping: the Trainer adds eval_
TRAINER_OWNED = {"output_dir", "load_best_model_at_end", "metric_for_best_model", "greater_is_better"}
_TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-5,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "num_train_epochs": 3,
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_total_limit": 2,
    "report_to": "none",
    "seed": 0,
    "disable_tqdm": True,
}


class RunConfig(Section):
    model: ModelConfig
    """The pre-trained model to fine-tune."""
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """What the model is trained to do."""
    data: DataConfig
    """Where the data comes from and how rows are read."""
    training: dict[str, Any] = Field(default_factory=dict)
    """Passed to transformers.TrainingArguments unchanged (tether sets output_dir and the best-model keys)."""
    lora: LoraSection | None = None
    """Train a PEFT LoRA adapter instead of all weights."""
    osf: OsfSection | None = None
    """Train PEFT's OSF (orthogonal subspace fine-tuning) instead of all weights: each adapted weight's top singular
    directions stay frozen and the rest train orthogonally to them; model/ is saved merged, as a plain model."""
    regularizers: list[RegularizerEntry] = Field(default_factory=list)
    """Regularizers, each {name, strength, ...}; see the README for every name and its fields."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop when validation stops improving and restore the best checkpoint."""
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    """What forgetting is measured on, tracked during training, and lm-eval tasks."""
    skip_non_finite: int = Field(0, ge=0)
    """Optimizer steps whose loss (with its autograd penalties) is NaN/inf that may be skipped (update dropped) before
    the run stops; 0: stop at the first (a spike that repeats is a real problem: lower the lr or a strength)."""
    output_dir: str = "runs/tether"
    """Where the run writes its model, metrics, history and checkpoints."""
    sweep: SweepConfig | None = None
    """The search space and objectives of `tether sweep` (see the README); `tether train` ignores it."""

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.task == "sequence_classification" and self.data.format != "text":
            raise ValueError("data.format must be text for task sequence_classification (rows are {text, label})")
        if self.data.packing and self.task != "causal_lm":
            raise ValueError("data.packing is for task causal_lm: remove it (classification rows are one text each)")
        if self.data.packing and any(r.name == "neftune" for r in self.regularizers):
            raise ValueError("neftune scales its noise by each row's length, which packing hides: drop one of them")
        names = [r.name for r in self.regularizers]
        if self.data.packing and "flow" in names:  # flow weighs the rows as they were at setup; packing joins them
            raise ValueError(
                f"regularizers[{names.index('flow')}]: flow weighs each training row and data.packing joins rows "
                "into one: set data.packing: false or remove flow"
            )
        if self.early_stopping:
            self._check_metric(self.early_stopping.metric)
        if self.model.synthetic and self.task == "causal_lm" and self.model.synthetic.arch in ("bert", "roberta"):
            raise ValueError(
                f"model.synthetic.arch {self.model.synthetic.arch} is an encoder: use task sequence_classification"
            )
        if self.early_stopping is not None and self.early_stopping.forgetting_budget is not None:
            self._check_budget(self.early_stopping.forgetting_measure)
        if self.lora is not None and self.osf is not None:
            raise ValueError("lora and osf are two kinds of adapter: keep one of the two sections")
        if self.lora is not None and self.lora.init == "corda_kpm" and not self.data.reference:
            raise ValueError("lora.init corda_kpm preserves what data.reference needs: set data.reference")
        return self

    def _check_metric(self, metric: str) -> None:
        """early_stopping.metric must be one the evaluations log: a misspelled one stopped the run at its first
        evaluation, after the training up to it."""
        if metric in CLASSIFICATION_METRICS and self.task == "causal_lm":
            raise ValueError(
                f"early_stopping.metric {metric} is measured for task sequence_classification only: use eval_loss"
            )
        name = metric if metric.startswith("eval_") else f"eval_{metric}"  # the Trainer's own completion
        logged = ["eval_loss", *(["eval_accuracy", "eval_f1"] if self.task != "causal_lm" else [])]
        ev = self.evaluation
        if ev.track and self.data.reference:
            logged += ["eval_reference_loss", "eval_forgetting", "eval_recall"]
        if ev.track and ev.probe_rows:
            logged.append("eval_probe_kl")
        lm_eval = ev.track and ev.lm_eval is not None and ev.lm_eval.at_evaluations
        if name not in logged and not (lm_eval and name.startswith("eval_lm_eval/")):
            more = ", eval_lm_eval/<task>/<metric>" if lm_eval else ""
            raise ValueError(
                f"early_stopping.metric {metric} is not logged at this run's evaluations: use one of "
                f"{', '.join(logged)}{more}"
            )

    def _check_budget(self, measure: str) -> None:
        if not self.evaluation.track:
            raise ValueError("early_stopping.forgetting_budget needs evaluation.track: true (forgetting is tracked)")
        if measure == "delta_loss" and not self.data.reference:
            raise ValueError(
                "early_stopping.forgetting_budget bounds the reference loss: set data.reference, or "
                "early_stopping.forgetting_measure: probe_kl"
            )
        if measure == "probe_kl" and not self.evaluation.probe_rows:
            raise ValueError("early_stopping.forgetting_measure probe_kl needs evaluation.probe_rows > 0")

    def training_arguments(self) -> dict[str, Any]:
        """TrainingArguments kwargs: tether's defaults, then the user's `training:` section."""
        return {**_TRAINING_DEFAULTS, **self.training}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file, apply `key.path=value` overrides, validate. Raises ConfigError with one clear line."""
    path = Path(path)
    if path.is_dir():  # a run directory: its config is inside
        inside = f" ({path / 'config.yaml'} is the run's)" if (path / "config.yaml").is_file() else ""
        raise ConfigError(f"config file {path} is a directory: pass the path of a YAML file{inside}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: pass the path of a YAML file")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({type(e).__name__}): fix the syntax") from None
    except ValueError as e:  # a scalar YAML cannot convert: an int of over 4300 digits, a date like 2024-13-01
        raise ConfigError(f"{path}: a value cannot be read ({_reason(e)}): fix it") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, training, ...)")
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a config mapping: the sections, the training arguments, the regularizers and the files."""
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    _check_training_keys(cfg.training)
    _check_early_stopping_saves(cfg)
    learning_rate = float(cfg.training_arguments()["learning_rate"])  # a number: _check_training_keys said so
    adapter = "lora" if cfg.lora is not None else "osf" if cfg.osf is not None else None
    parse_entries(cfg.regularizers, RunFacts(cfg.data.reference is not None, adapter, learning_rate))
    _check_files(cfg)
    if cfg.sweep is not None:
        _check_sweep(cfg, cfg.sweep)
    return cfg


def with_values(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """The config with each dotted path set to its value as `--set` would, validated, without the sweep section."""
    raw = cfg.model_dump(mode="json", exclude={"sweep"})
    for path, value in values.items():
        apply_override(raw, f"{path}={json.dumps(value)}")
    return validate_config(raw)


def _check_sweep(cfg: RunConfig, sweep: SweepConfig) -> None:
    """Every searched path must give a valid config at the ends of its range; metrics must be measured."""
    for path, param in sweep.params.items():
        for value in param.samples():
            try:
                with_values(cfg, {path: value})
            except ConfigError as e:
                raise ConfigError(f"sweep.params.{path} = {value!r}: {e}") from None
    reference_format = cfg.data.reference_format or cfg.data.format
    for name in [*sweep.objectives, *(c.metric for c in sweep.constraints)]:
        if name.startswith("forgetting.") and cfg.data.reference is None:
            raise ConfigError(f"sweep: {name} is measured on data.reference: set it or use target.* metrics")
        if "recall" in name and reference_format != "prompt_completion":
            raise ConfigError(f"sweep: {name} needs prompt_completion reference data (a fact set)")
        task = name.split(".")[1] if name.startswith("lm_eval.") else None
        if task is not None and (cfg.evaluation.lm_eval is None or task not in cfg.evaluation.lm_eval.tasks):
            raise ConfigError(f"sweep: {name} is measured with evaluation.lm_eval: list {task} in its tasks")
        if name in ("target.accuracy", "target.f1") and cfg.task != "sequence_classification":
            raise ConfigError(f"sweep: {name} is measured for task sequence_classification only")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML; list items by index) to the raw config mapping."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r} must look like key.path=value, e.g. training.learning_rate=1e-4")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, ".".join(parts[: i + 1]))
        if nxt is None:
            nxt = {}
            _set(node, part, nxt, key)
        node = nxt
    _set(node, parts[-1], _override_value(key, value), key)


def _override_value(key: str, value: str) -> Any:
    """The value of a `--set key=value`, read as YAML (1e-4 a number, [a, b] a list); empty is null."""
    try:
        return parse_yaml(value) if value else None
    except (yaml.YAMLError, ValueError) as e:
        reason = "not valid YAML" if isinstance(e, yaml.YAMLError) else _reason(e)
        raise ConfigError(f"--set {key}: the value cannot be read ({reason}): quote it or fix it") from None


def _reason(e: ValueError) -> str:
    """The first clause of a conversion error, without Python's advice to the programmer."""
    return str(e).splitlines()[0].split(";")[0][:200]


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {where}: '{part}' is not an index of a list of {len(node)} items")
        return node[int(part)]
    if isinstance(node, dict):
        return node.get(part)
    raise ConfigError(f"--set {where}: the parent is a value, not a section")


def _set(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        _child(node, part, key)
        node[int(part)] = value
    elif isinstance(node, dict):
        node[part] = value
    else:
        raise ConfigError(f"--set {key}: the parent is a value, not a section")


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        section, key = loc.rpartition(".")[0], loc.rpartition(".")[2]
        return f"unknown key '{key}' in {section or 'the config'}: remove it or check its spelling"
    if e["type"] == "missing":
        return f"{loc} is required: add it to the config"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg} (got {e.get('input')!r}): change it" if loc else msg


BOOL_TYPES = {str(bool), "bool", str(bool | None), "bool | None", "Optional[bool]"}  # as TrainingArguments annotates


def _check_training_keys(training: dict[str, Any]) -> None:
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    known = set(fields)
    for key, value in training.items():
        if value is None and key in fields and fields[key].default is not None:
            raise ConfigError(f"training.{key} is empty: give it a value or remove the key")
        if key in TRAINER_OWNED:
            raise ConfigError(f"training.{key} is set by tether: remove it (use output_dir / early_stopping instead)")
        if key == "weight_decay":
            raise ConfigError(
                "training.weight_decay: use the weight_decay regularizer instead (it skips biases/norms)"
            )
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"training.{key} is not a TrainingArguments field{extra}: remove or rename it")
        if str(fields[key].type) in BOOL_TYPES and value is not None and not isinstance(value, bool):
            # TrainingArguments does not check types: the string 'no' or 'off' would count as true
            raise ConfigError(f"training.{key}: {value!r} is not a boolean: write true or false")
        _check_number(key, str(fields[key].type), value)


# TrainingArguments checks neither types nor ranges of its numbers: 'abc' or -1 as a learning rate, a batch size of 0
# fail only inside training (the optimizer, the data loader), after the output directory was made; some it reads as
# something else without a word (max_steps -5 trains by epochs, save_total_limit 0 keeps every checkpoint).
NUMBER_TYPES = {str(int): int, "int | None": int, str(float): float, "float | None": float}
POSITIVE = {"learning_rate", "num_train_epochs", "logging_steps", "save_steps", "eval_steps"}
POSITIVE |= {"per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"}
POSITIVE |= {"eval_accumulation_steps"}
NON_NEGATIVE = {"warmup_steps", "max_grad_norm", "adam_epsilon", "label_smoothing_factor", "dataloader_num_workers"}
NON_NEGATIVE |= {"eval_delay"}
BOUNDS: dict[str, tuple[Callable[[float], bool], str]] = {
    **{key: (lambda v: v > 0, "greater than 0") for key in POSITIVE},
    **{key: (lambda v: v >= 0, "0 or more") for key in NON_NEGATIVE},
    "max_steps": (lambda v: v == -1 or v > 0, "-1 (train num_train_epochs) or greater than 0"),
    "save_total_limit": (lambda v: v > 0, "greater than 0 (null keeps every checkpoint)"),
    **{key: (lambda v: 0 <= v < 1, "at least 0 and below 1") for key in ("adam_beta1", "adam_beta2")},
    **{key: (lambda v: 0 <= v < 2**32, f"from 0 to {2**32 - 1}") for key in ("seed", "data_seed")},  # numpy's range
}


def _check_number(key: str, annotation: str, value: Any) -> None:
    kind = NUMBER_TYPES.get(annotation)
    if kind is None or value is None:
        return
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind is int and not whole:
        raise ConfigError(f"training.{key}: {value!r} is not a whole number: write one, e.g. 8")
    if not whole and not (isinstance(value, float) and math.isfinite(value)):
        raise ConfigError(f"training.{key}: {value!r} is not a finite number: write one, e.g. 1e-4")
    if kind is int and abs(value) >= 2**63:  # beyond int64: torch and the data loader overflow
        raise ConfigError(f"training.{key}: {value:.3g} is out of range: write a smaller number")
    within, bound = BOUNDS.get(key, (lambda v: True, ""))
    if not within(value):
        raise ConfigError(f"training.{key}: {value!r} must be {bound}: change it")


def _check_early_stopping_saves(cfg: RunConfig) -> None:
    """Early stopping restores the best checkpoint, so tether.run.training_args saves at every evaluation: a save
    cadence the user gave that differs would be overridden without a word (and config.yaml would still state it)."""
    if cfg.early_stopping is None:
        return
    kw, given = cfg.training_arguments(), cfg.training
    strategy = kw["eval_strategy"]
    if strategy == "no":
        raise ConfigError("early_stopping needs evaluations: set training.eval_strategy to steps or epoch")
    if strategy not in ("steps", "epoch"):
        return  # not a strategy: TrainingArguments names the choices
    why = "early_stopping restores the best checkpoint, so it saves at every evaluation"
    if given.get("save_strategy", strategy) != strategy:
        raise ConfigError(
            f"training.save_strategy {given['save_strategy']}: {why} (eval_strategy {strategy}): remove "
            f"save_strategy or set it to {strategy}"
        )
    if strategy != "steps":
        return  # epoch saves do not read save_steps
    if kw["eval_steps"] is None:  # TrainingArguments would evaluate every logging_steps, and save every None
        raise ConfigError("training.eval_steps is empty: early_stopping saves at every evaluation: give it a value")
    if given.get("save_steps", kw["eval_steps"]) != kw["eval_steps"]:
        raise ConfigError(
            f"training.save_steps {given['save_steps']}: {why} (eval_steps {kw['eval_steps']}): remove save_steps "
            f"or set it to {kw['eval_steps']}"
        )


def _check_files(cfg: RunConfig) -> None:
    for name in ("train", "validation", "reference"):
        value = getattr(cfg.data, name)
        if value is not None and _looks_like_file(value) and not Path(value).exists():
            raise ConfigError(f"data.{name}: file {value} does not exist: fix the path (relative to the working dir)")
    if cfg.model.path is not None and _looks_like_file(cfg.model.path) and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path: directory {cfg.model.path} does not exist: fix the path or give a hub id")


def _looks_like_file(value: str) -> bool:
    """Local paths (absolute, ./, ../ or with a data suffix); anything else may be a hub id."""
    return value.startswith(("/", "./", "../", "~")) or value.endswith((".jsonl", ".json")) or Path(value).exists()


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what `config.yaml` in a run directory holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
