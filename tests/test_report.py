"""The HTML report (tether train writes it; tether report for several runs), TensorBoard scalars, pass progress."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import write_data_files
from tether.config import validate_config
from tether.errors import TetherError
from tether.report.html import figure_tag, page, table_tag
from tether.report.runs import write_report
from tether.run import train

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What a test reads from a report: section headings, images (src, alt) and the cells of each table."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[dict[str, str]] = []
        self.tables: list[list[list[str]]] = []
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        if tag in ("h2", "h3", "th", "td"):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "h3"):
            self.headings.append("".join(self._text or []))
        elif tag in ("th", "td"):
            self.tables[-1][-1].append("".join(self._text or []))
        if tag in ("h2", "h3", "th", "td"):
            self._text = None

    def column(self, table: int, name: str) -> list[str]:
        header, *rows = self.tables[table]
        return [row[header.index(name)] for row in rows]


def png_size(src: str) -> tuple[int, int]:
    """Width and height from the IHDR chunk of an inline PNG; fails unless it is one."""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    data = base64.b64decode(src[len(prefix) :], validate=True)
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished tiny runs: "anchored" (l2_sp, ema, wise_ft, early stopping, TensorBoard) and "plain"."""
    root = tmp_path_factory.mktemp("report")
    files = write_data_files(root)
    base = {
        "model": {"synthetic": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4}},
        "data": {k: str(v) for k, v in files.items()} | {"format": "prompt_completion", "max_length": 32},
        "training": {"learning_rate": 3e-3, "max_steps": 12, "eval_steps": 4, "logging_steps": 4},
    }
    anchored = base | {
        "regularizers": [
            {"name": "l2_sp", "strength": 0.1},
            {"name": "ema", "decay": 0.8},
            {"name": "wise_ft", "alphas": [0.0, 0.5, 1.0]},
        ],
        "early_stopping": {"patience": 5},
    }
    anchored["training"] = base["training"] | {"report_to": ["tensorboard"]}
    train(validate_config(anchored), root / "anchored")
    train(validate_config(base), root / "plain")
    return {"anchored": root / "anchored", "plain": root / "plain"}


def test_train_writes_a_report_of_its_run(runs):
    run = runs["anchored"]
    metrics = json.loads((run / "metrics.json").read_text())
    doc = Page((run / "report.html").read_text())
    for heading in ("Summary", "Loss curves", "Regularizer terms", "Forgetting", "Alternative final models", "Config"):
        assert heading in doc.headings
    assert 'src="http' not in (run / "report.html").read_text(), "self-contained: nothing loaded from outside"
    assert len(doc.images) >= 4  # losses, penalty terms, forgetting bars, wise_ft trade-off
    assert all(min(png_size(img["src"])) > 50 for img in doc.images)
    assert any("reg/l2_sp" in img["alt"] for img in doc.images)
    summary = doc.tables[0]
    assert doc.column(0, "val_loss") == [f"{metrics['target']['val_loss']:.4g}"]
    assert doc.column(0, "delta_loss") == [f"{metrics['forgetting']['delta_loss']:.4g}"]
    assert "l2_sp=0.1, ema, wise_ft" in summary[1]
    cells = [cell for table in doc.tables for row in table for cell in row]
    assert "ema decay 0.8 (model_ema/)" in cells
    assert any(c.startswith("yes (model_wise_ft/)") for c in cells)


def test_report_of_two_runs_compares_them(runs, tmp_path):
    out = write_report([runs["anchored"], runs["plain"]], tmp_path / "both.html")
    doc = Page(out.read_text())
    assert doc.headings[:2] == ["Comparison", "Trade-off: forgetting against target loss"]
    assert {"Run anchored", "Run plain"} <= set(doc.headings)
    assert doc.column(0, "run") == ["anchored", "plain"]
    for i, name in enumerate(("anchored", "plain")):
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert doc.column(0, "delta_loss")[i] == f"{metrics['forgetting']['delta_loss']:.4g}"
    assert doc.column(0, "regularizers")[1] == "none"
    assert "one point per run" in doc.images[0]["alt"]
    assert all(min(png_size(img["src"])) > 50 for img in doc.images)
    assert doc.headings.count("Regularizer terms") == 2


def test_tensorboard_gets_the_penalty_terms_and_the_final_metrics(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = json.loads((runs["anchored"] / "metrics.json").read_text())
    (logdir,) = (runs["anchored"] / "runs").iterdir()
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "train/reg/l2_sp" in tags
    for tag, expected in (
        ("final/forgetting/delta_loss", metrics["forgetting"]["delta_loss"]),
        ("final/target/val_loss", metrics["target"]["val_loss"]),
        ("final/ema/forgetting/delta_loss", metrics["ema"]["forgetting"]["delta_loss"]),
    ):
        (scalar,) = events.Scalars(tag)
        assert scalar.step == metrics["global_step"]
        assert scalar.value == pytest.approx(expected, rel=1e-6)
    assert not (runs["plain"] / "runs").exists(), "no TensorBoard files unless report_to asks for them"


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from tether.cli import main

    monkeypatch.setattr(sys, "argv", ["tether", "report", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_report_default_output_and_bad_dirs(runs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "copy"
    shutil.copytree(runs["plain"], run, ignore=shutil.ignore_patterns("model*", "checkpoint-*"))
    (run / "report.html").unlink()
    code, out, _ = _cli(monkeypatch, capsys, str(run))
    assert code == 0 and (run / "report.html").is_file(), out
    monkeypatch.chdir(tmp_path)
    code, _, _ = _cli(monkeypatch, capsys, str(run), str(runs["anchored"]))
    assert code == 0 and "Comparison" in Page((tmp_path / "report.html").read_text()).headings
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "metrics.json").write_text("{not json")
    for bad, expected in (
        (tmp_path / "missing", "is not a directory"),
        (tmp_path, "has no metrics.json"),
        (broken, "metrics.json cannot be read"),
    ):
        code, _, err = _cli(monkeypatch, capsys, str(run), str(bad), "--output", str(tmp_path / "never.html"))
        assert code == 2 and expected in err.replace("\n", ""), err
        assert "pass the output directory of a finished" in err.replace("\n", "")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "never.html").exists()
    with pytest.raises(TetherError, match="no run directory"):
        write_report([], tmp_path / "never.html")


def test_html_blocks_escape_format_and_close_figures():
    import matplotlib.pyplot as plt

    table = table_tag([{"a": 1.23456789, "b": "<script>", "c": 3}, {"a": None, "c": float("nan")}], ["a", "b", "c"])
    doc = Page(table)
    assert doc.tables[0] == [["a", "b", "c"], ["1.235", "<script>", "3"], ["", "", "nan"]]
    assert "<script>" not in table
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tag = figure_tag(fig, 'curve "x"')
    assert not plt.get_fignums(), "the figure is closed"
    html = page("T <1>", [("S & S", tag)])
    doc = Page(html)
    assert html.startswith("<!DOCTYPE html>") and "T &lt;1&gt;" in html
    assert doc.headings == ["S & S"] and doc.images[0]["alt"] == 'curve "x"'
    assert min(png_size(doc.images[0]["src"])) > 50


def test_evaluation_passes_report_progress(runs, monkeypatch):
    """Each pass announces its row count and advances by exactly that; chunked recall counts the same hits."""
    from tether.data import Collator, load_split
    from tether.evaluate import dataset_metrics, reference_metrics
    from tether.models import load_model

    cfg = validate_config(_config_of(runs["plain"]))
    saved = cfg.model.model_copy(update={"path": str(runs["plain"] / "model"), "synthetic": None})
    model, tok, _ = load_model(saved, "causal_lm")
    facts = load_split(cfg.data.reference, "reference", "prompt_completion", "causal_lm", tok, 32)
    collator = Collator(tok.pad_token_id)
    passes: dict[str, list] = {}

    def progress(description: str, total: int | None):
        passes[description] = [total, 0]
        return lambda n: passes[description].__setitem__(1, passes[description][1] + n)

    # A stand-in recall that knows which prompts it got: hits are the prompts of items 0, 2, 4, ...
    def recall(m, t, prompts, completions, advance=None):
        for start in range(0, len(prompts), 5):  # batches of 5: 12 facts advance by 5, 5 and 2
            if advance is not None:
                advance(len(prompts[start : start + 5]))
        return sum(int(p.split()[4]) % 2 == 0 for p in prompts) / len(prompts)

    monkeypatch.setattr("tether.evaluate.exact_match_recall", recall)
    with_progress = reference_metrics(model, tok, facts, collator, progress)
    assert with_progress == reference_metrics(model, tok, facts, collator)
    assert with_progress["recall"] == 6 / 12
    assert passes == {"reference data: loss": [12, 12], "reference data: recall": [12, 12]}
    seen: list[int] = []
    dataset_metrics(model, facts.encoded, collator, batch_size=5, advance=seen.append)
    assert seen == [5, 5, 2]


def _config_of(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed: `make test-all` installs it (apt-get install chromium); it could not")
    return path


def _render(chromium: str, page_path: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a file, offline and without a profile: the dumped DOM on stdout, console on stderr."""
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=5000",
    ]  # fmt: skip
    return subprocess.run(
        [chromium, *flags, *extra, page_path.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )


# Run by the test on a copy of the page (the report itself has no script): image sizes into the DOM once loaded.
PROBE = """<script>
window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => i.naturalWidth + "x" + i.naturalHeight);
  document.body.setAttribute("data-image-sizes", sizes.join(" "));
});
</script>"""


def _sizes_and_console(chromium: str, html: str, tmp: Path) -> tuple[list[tuple[int, int]], list[str]]:
    probe = tmp / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    res = _render(chromium, probe, tmp, "--dump-dom")
    attr = res.stdout.split('data-image-sizes="', 1)[1].split('"', 1)[0]
    sizes = [tuple(int(v) for v in s.split("x")) for s in attr.split()]
    return sizes, [line for line in res.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_report_renders_in_headless_chromium(runs, tmp_path):
    chromium = _chromium()
    out = write_report([runs["anchored"], runs["plain"]], tmp_path / "report.html")
    html = out.read_text()
    # The check itself must be able to fail: a broken image reads 0x0 and a console message is seen.
    broken = html.replace(
        "</body>", '<img src="data:image/png;base64,AAAA"><script>console.error("x")</script></body>'
    )
    sizes, console = _sizes_and_console(chromium, broken, tmp_path)
    assert sizes[-1] == (0, 0) and len(console) == 1, (sizes, console)
    sizes, console = _sizes_and_console(chromium, html, tmp_path)
    assert len(sizes) == html.count("<img ") and all(w > 50 and h > 50 for w, h in sizes), sizes
    assert console == [], console
    shot = tmp_path / "report.png"
    _render(chromium, out, tmp_path, f"--screenshot={shot}", "--window-size=1200,3000")
    assert png_size("data:image/png;base64," + base64.b64encode(shot.read_bytes()).decode()) == (1200, 3000)
