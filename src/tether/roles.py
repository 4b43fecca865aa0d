"""Who may use data.reference: the rows forgetting is measured on are never trained on by default.

data.reference is what the run must not forget, and it is measured before and after. replay (mixing its rows into
training), ewc (its Fisher) and si (its importance) would also read it when they have no data of their own
(replay.source, ewc.data). Replaying the measured rows makes the measured forgetting flatter the method (the rows
are learned again, not kept), so by default those rows are split: a seeded share (evaluation.reference_holdout,
0.5 when such a regularizer is configured) goes to the regularizers and the rest is measured. The split, the row
counts and what each regularizer read are written to metrics.json as `reference_roles`. Training on the measured
rows happens only with evaluation.train_on_measured, or when a regularizer's own file is data.reference itself; the
record then says trained_on_measured: true, and the report shows a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.config import RunConfig
from tether.data import Split, split_off

DEFAULT_HOLDOUT = 0.5  # half of the reference for the regularizers when they need it and no share is given
TOO_FEW = (
    "data.reference has fewer than 2 rows: it cannot be split between measurement and regularizers: add rows, or "
    "give replay.source / ewc.data"
)


@dataclass(frozen=True)
class Roles:
    measured: Split | None
    """The rows forgetting is measured on (before, during and after training)."""
    regularizers: Split | None
    """The rows the regularizers without data of their own read (None: no such regularizer, or no reference)."""
    record: dict[str, Any]
    """metrics.json `reference_roles`."""


def reference_readers(cfg: RunConfig) -> dict[str, str | None]:
    """{regularizer name: its own data file, or None when it reads data.reference} for replay, ewc and si (and
    lora.init corda_kpm, which calibrates the adapters on it)."""
    from tether.regularizers import parse_entries
    from tether.regularizers.ewc import EWCConfig
    from tether.regularizers.replay import ReplayConfig

    readers: dict[str, str | None] = {}
    for reg in parse_entries(cfg.regularizers):
        own = reg.source if isinstance(reg, ReplayConfig) else reg.data if isinstance(reg, EWCConfig) else None
        if own is not None or reg.without_reference_data() is not None:
            readers[reg.name] = own
    if cfg.lora is not None and cfg.lora.init == "corda_kpm":  # calibrates the adapters on the reference data
        readers["lora.init corda_kpm"] = None
    return readers


def assign_roles(cfg: RunConfig, reference: Split | None) -> Roles:
    """Split data.reference between measurement and the regularizers that read it (see the module docstring)."""
    readers = reference_readers(cfg)
    if reference is None:
        return Roles(None, None, {"measured_rows": 0, "readers": readers_text(readers, None, False)})
    ev = cfg.evaluation
    needing = [name for name, own in readers.items() if own is None]
    share = ev.reference_holdout
    if share is None and needing and not ev.train_on_measured:
        share = DEFAULT_HOLDOUT
    measured, held = reference, None
    if share is not None:
        measured, held = split_reference(reference, share, cfg.data.seed)
    given = reference if ev.train_on_measured else held
    same_file = [n for n, own in readers.items() if own is not None and _same(own, cfg.data.reference)]
    record = split_record(measured, held, given if needing else None, share, cfg.data.seed)
    record["readers"] = readers_text(readers, given, ev.train_on_measured)
    record["trained_on_measured"] = bool(same_file) or record["measured_examples_read"] > 0
    return Roles(measured, given if needing else None, record)


def split_record(
    measured: Split, held: Split | None, given: Split | None, share: float | None, seed: int
) -> dict[str, Any]:
    """metrics.json `reference_roles` counts: rows and the examples they make (a long text row is windowed into
    several), the split, and how many measured examples the regularizers also read (`given`): the measured rows
    themselves (train_on_measured), or duplicates that the split put on both sides."""
    read = set() if given is None else {tuple(e["input_ids"]) for e in given.encoded}
    return {
        "measured_rows": rows_in(measured),
        "measured_examples": len(measured.encoded),
        "held_out_rows": 0 if held is None else rows_in(held),
        "held_out_examples": 0 if held is None else len(held.encoded),
        "holdout_share": share,
        "split_seed": seed if share is not None else None,
        "measured_examples_read": sum(tuple(e["input_ids"]) in read for e in measured.encoded),
    }


def rows_in(split: Split) -> int:
    return len(distinct(split.rows))


def distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row once, in order: a windowed row's windows share the one row object (equal rows are kept)."""
    return list({id(row): row for row in rows}.values())


def split_reference(reference: Split, share: float, seed: int, too_few: str = TOO_FEW) -> tuple[Split, Split]:
    """(measured, held out for the regularizers): `share` of the rows held out, a row's windows together. Its own
    seeded stream, not the validation split's order; `tether train` and tether.regularize split alike by it."""
    return split_off(reference, share, f"reference-roles-{seed}", too_few)


def readers_text(readers: dict[str, str | None], given: Split | None, everything: bool) -> dict[str, str]:
    """What each reader read, in words, for metrics.json and the report."""
    rows = "" if given is None else f" ({counted(given)})"
    shared = (
        "every row of data.reference, the measured ones too" if everything else "the held-out rows of data.reference"
    )
    return {name: own if own is not None else shared + rows for name, own in readers.items()}


def counted(split: Split) -> str:
    """'8 rows', or '30 rows, 65 examples' when long rows were windowed."""
    rows, examples = rows_in(split), len(split.encoded)
    return f"{rows} rows" if rows == examples else f"{rows} rows, {examples} examples"


def _same(path: str, reference: str | None) -> bool:
    return reference is not None and Path(path).expanduser().resolve() == Path(reference).expanduser().resolve()
