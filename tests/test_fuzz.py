"""Bad input, fuzzed: generated configs and dataset files thrown at `tether validate` and `tether train`.

Every case must end in exit code 0 (the input happened to be valid) or 2 with one clear error line — never a
traceback — and a rejected case writes nothing. The number of cases tried is printed in the test summary.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
CASES: dict[str, int] = {}
SAME_LINE = {"--set"}  # classes whose values validate checks exactly as train's setup (data is read only by train)

BASE: dict[str, Any] = {
    "model": {"synthetic": {"arch": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2}},
    "task": "causal_lm",
    "data": {
        "train": str(ROOT / "examples/data/add_train.jsonl"),
        "validation": str(ROOT / "examples/data/add_val.jsonl"),
        "reference": str(ROOT / "examples/data/facts.jsonl"),
        "format": "prompt_completion",
        "max_length": 24,
    },
    "training": {"max_steps": 2, "eval_steps": 1, "per_device_train_batch_size": 4},
    "regularizers": [{"name": "weight_decay", "strength": 0.01}, {"name": "l2", "strength": 1e-4}],
    "early_stopping": {"patience": 1},
}
PATHS = [
    "model", "model.synthetic", "model.synthetic.arch", "model.synthetic.hidden_size", "model.synthetic.num_heads",
    "model.path", "model.dtype", "model.trust_remote_code", "task", "data", "data.train", "data.validation",
    "data.reference", "data.format", "data.max_length", "data.validation_fraction", "training",
    "training.learning_rate", "training.max_steps", "training.per_device_train_batch_size", "training.eval_steps",
    "training.lr_scheduler_type", "training.num_train_epochs", "training.gradient_accumulation_steps",
    "training.per_device_eval_batch_size", "training.warmup_steps", "training.logging_steps",
    "regularizers", "regularizers.0", "regularizers.0.name", "regularizers.0.strength",
    "regularizers.1.strength", "early_stopping", "early_stopping.patience", "early_stopping.mode", "lora",
    "lora.r", "lora.dropout", "lora.target_modules", "output_dir", "bogus_section",
]  # fmt: skip
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["l3", "llama", "nope.jsonl", "/nonexistent/x.jsonl", "chat", "-1", "1e-4"]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _set(raw: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node: Any = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, dict | list):
            return
    if isinstance(node, list):
        node[int(last) % len(node)] = value
    elif value is None and last in node and path.count(".") < 2:
        del node[last]  # a missing section or key
    else:
        node[last] = value


def _check(monkeypatch, capsys, tmp_path: Path, raw: dict, kind: str, sets: tuple[str, ...] = (), out=None) -> None:
    CASES[kind] = CASES.get(kind, 0) + 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = out or tmp_path / "out"
    overrides = [a for s in sets for a in ("--set", s)]
    code, err = _run(monkeypatch, capsys, "validate", str(cfg), *overrides)
    assert code in (0, 2), err
    existed = _exists(out)
    train_code, train_err = _run(monkeypatch, capsys, "train", str(cfg), "--output-dir", str(out), *overrides)
    assert train_code in (0, 2), train_err
    if train_code == 2 and kind in SAME_LINE and not train_err.startswith("error: step "):  # not a NaN in training
        assert err == train_err, "validate must reject what train rejects before training, with the same line"
    for message, c in ((err, code), (train_err, train_code)):
        assert "Traceback" not in message
        if c == 2:
            assert message.startswith("error: ") and len(message.strip().splitlines()) == 1, message
    if train_code == 2 and not existed:
        assert not _exists(out), f"a rejected run wrote {list(out.rglob('*'))}"
    if code == 2:
        assert train_code == 2, "train must reject what validate rejects"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long
        return False


# Bounded: each case may train a 1-layer model for 2 steps; shrinking is off so a failure reports at once.
FUZZ = settings(
    max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
    phases=[Phase.explicit, Phase.generate],
)  # fmt: skip


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=3))
# Contradictions that random values seldom hit: importance or replay without reference data, early stopping
# without evaluations, a LoRA-only option in full fine-tuning, a Fisher file that is not there.
@example(changes=[("regularizers.0", {"name": "ewc"}), ("data.reference", None)])
@example(changes=[("regularizers.0", {"name": "si"}), ("data.reference", None)])
@example(changes=[("regularizers.0", {"name": "replay", "ratio": 0.1}), ("data.reference", None)])
@example(changes=[("training.eval_strategy", "no")])
@example(changes=[("regularizers.0", {"name": "kl", "reference": {"adapter": "clone"}})])
@example(changes=[("regularizers.0", {"name": "ewc", "fisher_path": "/nonexistent/f.safetensors"})])
def test_fuzzed_configs(monkeypatch, capsys, tmp_path_factory, changes):
    tmp_path = tmp_path_factory.mktemp("cfg")
    raw = copy.deepcopy(BASE)
    for path, value in changes:
        _set(raw, path, value)
    _check(monkeypatch, capsys, tmp_path, raw, "config")


BAD_LINES = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),  # random bytes, often invalid UTF-8 / JSON
    st.sampled_from([b"{", b"[]", b"null", b'"text"', b'{"prompt": "1+1="}', b'{"completion": "2"}',
                     b'{"prompt": 1, "completion": "2"}', b'{"prompt": "1+1=", "completion": null}',
                     b'{"prompt": "' + b"9" * 400 + b'", "completion": "1"}', b"\xff\xfe\x00"]),
    st.dictionaries(st.sampled_from(["prompt", "completion", "text", "x"]),
                    st.one_of(st.text(max_size=8), st.integers()), max_size=3).map(lambda d: json.dumps(d).encode()),
)  # fmt: skip


@FUZZ
@given(lines=st.lists(BAD_LINES, min_size=0, max_size=4), field=st.sampled_from(["train", "validation", "reference"]))
def test_fuzzed_dataset_files(monkeypatch, capsys, tmp_path_factory, lines, field):
    tmp_path = tmp_path_factory.mktemp("data")
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"\n".join(lines))
    raw = copy.deepcopy(BASE)
    raw["data"][field] = str(data)
    _check(monkeypatch, capsys, tmp_path, raw, "data")


SET_VALUES = st.one_of(
    st.text(max_size=16), st.sampled_from(["[1", "{a: ", "'x", "!!python/object:os.system", "- a\n- b", "1" * 100_000,
                                           "1" * 5000 + ".5", "0x1F", "1_000", ".nan", "-.inf", "~", "2024-13-45"]),
)  # fmt: skip


SET_PATHS = [p for p in PATHS if not p.startswith(("data", "model.path"))]  # hub ids: network retries, data errors


@FUZZ
@given(path=st.sampled_from(SET_PATHS), value=SET_VALUES)
@example(path="training.learning_rate", value="abc")
@example(path="training.max_steps", value="1" * 100_000)
@example(path="training.lr_scheduler_type", value="warp")
def test_fuzzed_set_values(monkeypatch, capsys, tmp_path_factory, path, value):
    """`--set key=value` reads the value as YAML: whatever is typed is one line or a valid run."""
    _check(monkeypatch, capsys, tmp_path_factory.mktemp("set"), copy.deepcopy(BASE), "--set", (f"{path}={value}",))


OUTPUT_PATHS = st.one_of(
    st.sampled_from(["x" * 300, "x/" * 3000, "a-file/run", "a-file", "ünïcode run", "deep/" * 20 + "run", " "]),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=40),
)  # fmt: skip


@settings(FUZZ, max_examples=12)
@given(name=OUTPUT_PATHS)
def test_fuzzed_output_paths(monkeypatch, capsys, tmp_path_factory, name):
    """Names too long, a file in the way, odd characters: one line (or a run)."""
    tmp_path = tmp_path_factory.mktemp("path")
    (tmp_path / "a-file").write_text("not a directory")
    raw = copy.deepcopy(BASE)
    raw["training"]["max_steps"] = 1
    _check(monkeypatch, capsys, tmp_path, raw, "path", out=tmp_path / name)
