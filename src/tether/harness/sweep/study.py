"""The shared study: what every worker needs (Job), and opening the Optuna study in its storage, refusing one made
from another config."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tether.config import SWEEP_METRICS, RunConfig, SweepConfig
from tether.errors import TetherError, one_line

DONE = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward the requested number of trials
MAX_RETRY = 3  # a trial whose worker keeps dying (out of memory) is given up after this many re-runs
CONFIG_ATTR = "tether_config"


@dataclass(frozen=True)
class Job:
    """What every worker needs to take part in the sweep (sent to the worker processes as JSON)."""

    cfg: RunConfig
    out: Path
    storage: str
    study_name: str
    trials: int

    def to_json(self) -> dict[str, Any]:
        return {"cfg": self.cfg.model_dump(mode="json"), "out": str(self.out), "storage": self.storage,
                "study_name": self.study_name, "trials": self.trials}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        cfg = RunConfig.model_validate(data["cfg"])
        return cls(cfg, Path(data["out"]), data["storage"], data["study_name"], data["trials"])

    @property
    def sweep(self) -> SweepConfig:
        assert self.cfg.sweep is not None
        return self.cfg.sweep


def finished(study: optuna.Study) -> int:
    """Trials that count toward the requested number: completed or pruned."""
    return len(study.get_trials(deepcopy=False, states=DONE))


def _quiet() -> None:
    """Spawned workers start with fresh logging: keep the per-file save bars and Optuna's chatter out."""
    from transformers.utils import logging as hf_logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures reach the user as tether errors, once
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_study(job: Job, check_new: bool = False) -> optuna.Study:
    """The study in the storage, created on first use; refuses a study made from another config."""
    _quiet()
    directions = [SWEEP_METRICS[m] for m in job.sweep.objectives]
    try:
        storage = optuna.storages.RDBStorage(
            job.storage,
            engine_kwargs=_engine_kwargs(job.storage),
            heartbeat_interval=max(1, job.sweep.stale_after_s // 4),
            grace_period=job.sweep.stale_after_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
        study = optuna.create_study(
            storage=storage, study_name=job.study_name, directions=directions, sampler=_sampler(),
            pruner=optuna.pruners.MedianPruner() if prunable(job.sweep) else optuna.pruners.NopPruner(),
            load_if_exists=True,
        )  # fmt: skip
    except ImportError as e:
        raise TetherError(f"--storage {masked(job.storage)}: no database driver ({e}): install it") from None
    except SQLAlchemyError as e:  # a bad URL, host down, wrong password: all a bad --storage for the user
        first = one_line(e)
        raise TetherError(f"--storage {masked(job.storage)}: cannot use the database ({first})") from None
    _check_config(study, job, check_new)
    return study


def _engine_kwargs(url: str) -> dict[str, Any]:
    # SQLite lets one writer at a time in and makes the others wait at most `timeout` seconds (5 by default):
    # K workers, their heartbeats and a report can queue longer than that.
    return {"connect_args": {"timeout": 60}} if make_url(url).get_backend_name() == "sqlite" else {}


def masked(url: str) -> str:
    """The storage URL as it may be shown: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:  # an unparsable URL: show it without its credentials part
        return url.split("@")[-1]


def _sampler() -> optuna.samplers.BaseSampler:
    # TPE handles several objectives and the constraints set on trials; constant_liar: parallel workers see running
    # trials as bad, so that they do not all sample the same point.
    return optuna.samplers.TPESampler(constant_liar=True)


def prunable(sweep: SweepConfig) -> bool:
    """Whether intermediate evaluations can prune: Optuna prunes single-objective studies only."""
    return sweep.objectives == ["target.val_loss"]


def _identity(job: Job) -> str:
    """The config as the study must keep it: everything but where this machine writes and how many trials."""
    raw = job.cfg.model_dump(mode="json", exclude={"output_dir"})
    raw["sweep"].pop("trials")
    return json.dumps(raw, sort_keys=True)


def _check_config(study: optuna.Study, job: Job, check_new: bool) -> None:
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        if check_new and any(job.out.glob("trial-*")):
            raise TetherError(
                f"{job.out} holds trial directories of another study (the storage has no study "
                f"'{job.study_name}'): choose another --output-dir, or pass the --storage and --study they belong to"
            )
        study.set_user_attr(CONFIG_ATTR, _identity(job))
    elif stored != _identity(job):
        raise TetherError(
            f"study '{job.study_name}' in {masked(job.storage)} was made from a different config (search space, "
            "objectives or run settings): pass another --study, or the config it was made from"
        )
