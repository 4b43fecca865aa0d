"""merge: after training, search merges of the original and the fine-tuned weights against measured forgetting.

It extends wise_ft (whose tensors, choice rule and plot it shares): with delta = theta - theta_0 over the tensors
WiSE-FT interpolates (under LoRA the adapter factor that was zero at setup, so that every candidate is again an
adapter of the same rank), each candidate is theta_0 + w * delta' and is measured like the final model (target
val loss and, with reference data, forgetting). The candidates:

  global     w = alpha for every tensor, each alpha in `alphas` (WiSE-FT's interpolation)
  layers     w = alpha_d per depth d (embeddings 0, block i at i + 1, head and final norm last: llrd's depths),
             by coordinate search from the chosen global alpha: each depth in turn tries the other `alphas`, and a
             move is kept when it lowers the search score (the least reference loss among the candidates within
             `tolerance` of the best global target loss; a candidate outside the band scores by its target loss);
             passes repeat until one changes nothing or `search_evaluations` candidates were measured
  dare       delta' = m * delta / density with m ~ Bernoulli(density) per entry, seeded (Yu et al. 2023, DARE):
             E[delta'] = delta; at each density in `densities` and each alpha > 0
  ties       delta' = TIES-merging (Yadav et al. 2023) of the one delta: trimmed to its top `density` share of
             entries by magnitude per tensor (with one fine-tune the elected sign and the disjoint mean leave the
             kept entries as they are); at each density and each alpha > 0
  fisher     w = lam / (lam + F / mean F) per entry, each lam in `fisher_scales`: Fisher merging (Matena & Raffel
             2022) of theta_0, weighted by the diagonal Fisher of the original model on the reference data, with
             the fine-tuned model weighted by lam everywhere. Entries the reference data depends on stay near
             theta_0. Needs the Fisher ewc wrote to RUN_DIR/fisher.safetensors: add ewc to the run (strength 0
             estimates and writes it without pulling); without it these candidates are left out (said in the
             results)

Every candidate's row goes to metrics.json under `merge` (`candidates`), the front to merge.png, and the one chosen
by wise_ft's rule (`choose`, `tolerance`: among the candidates within tolerance of the best target loss, the least
reference loss) is saved to output_dir/model_merge/, its metrics next to the rows. The main model/ stays the
fine-tuned one. The choice and the layer search look at the validation data: the chosen model's numbers are
optimistic, the more so the more candidates. Under LoRA the dare and ties candidates act on that factor:
E[delta W'] = delta W for dare, and each candidate keeps the adapter's rank. PEFT's add_weighted_adapter is not used:
given one adapter it turns every combination type into "linear" (peft 0.21, _check_add_weighted_adapter), and its
DARE/TIES without SVD prune both factors, the random initialization of A too. Under OSF delta is each adapted
layer's weight change U_low S_low V_low - U_low_0 S_low_0 V_low_0 (wise_ft's module docstring), so every candidate
is W_0 + w * delta' of those weights too; the fisher candidates are left out (said in the results): the Fisher ewc
writes there is of U_low, S_low, V_low, whose entries are not the weight change's. strength is unused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tether.errors import ConfigError
from tether.regularizers.anchor import snapshot
from tether.regularizers.base import FinishContext, Regularizer, SetupContext, nbytes, register
from tether.regularizers.ewc import RUN_FISHER
from tether.regularizers.llrd import depths
from tether.regularizers.wise_ft import (
    WiseFTConfig,
    applied_rule,
    interpolated,
    osf_folded,
    osf_layers,
    pick,
    plot_front,
    summary,
)
from tether.selection import within_tolerance

Values = list[torch.Tensor]
NO_FISHER = f"no {RUN_FISHER} in the run (add ewc, strength 0 only estimates it)"


class MergeConfig(WiseFTConfig):
    choose: Literal["least_forgetting", "best_target"] = "least_forgetting"
    """Which candidate to save to model_merge/: least_forgetting (the least reference loss within `tolerance` of
    the best target loss) or best_target."""
    search_evaluations: int = Field(24, ge=0)
    """Candidates the per-layer search may measure (each one evaluation of the model); 0: no layer search."""
    densities: list[float] = Field(default_factory=lambda: [0.1, 0.5])
    """Shares of the delta's entries that dare and ties keep, each in (0, 1]; empty: no dare or ties candidates."""
    fisher_scales: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0])
    """lam of the Fisher-weighted candidates (relative to the mean Fisher): larger keeps more of the fine-tune."""
    seed: int = 0
    """Seed of dare's random drops."""

    @field_validator("densities")
    @classmethod
    def _densities(cls, value: list[float]) -> list[float]:
        if any(not 0 < d <= 1 for d in value):
            raise ValueError("each density is the share of entries kept: give values in (0, 1]")
        return sorted(set(value))

    @field_validator("fisher_scales")
    @classmethod
    def _scales(cls, value: list[float]) -> list[float]:
        if any(not s > 0 for s in value):
            raise ValueError("give positive fisher_scales")
        return sorted(set(value))


@register("merge", MergeConfig)
class Merge(Regularizer):
    sharded_parameters = False  # interpolates whole parameter tensors
    touches_parameters = True

    def __init__(self, config: MergeConfig) -> None:
        self.config = config
        self.names: list[str] = []
        self.params: Values = []
        self.start: Values = []
        self.depth: list[int] = []

    def setup(self, ctx: SetupContext) -> None:
        named = interpolated(ctx.model)
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.start = snapshot(self.params)
        self.depth = layer_depths(ctx.model, self.params) if self.config.search_evaluations else []

    def memory(self) -> dict[str, int]:
        return {"start weights": nbytes(self.start)}

    def after_training(self, model: nn.Module, ctx: FinishContext) -> dict[str, Any]:
        with osf_folded(model, self.params, self.start):
            trained = [p.detach().clone() for p in self.params]
            search = Search(self, model, ctx.evaluate, torch._foreach_sub(trained, self.start))
            try:
                notes = search.run(*self.fisher_weights(model, ctx.output_dir / RUN_FISHER))
                chosen = pick(search.rows, self.config.choose, self.config.tolerance)
                self.set(search.values[chosen["candidate"]]())
                ctx.save(model, "model_merge")
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self.params, trained)
        plot(search.rows, chosen, ctx.output_dir / "merge.png")
        rule = applied_rule(search.rows, self.config.choose)
        out = {"candidates": search.rows, "chosen": chosen["candidate"], "choose": rule, **notes}
        return {**out, **search.metrics[chosen["candidate"]]}

    def fisher_weights(self, model: nn.Module, path: Path) -> tuple[Values | None, str]:
        """The run's Fisher as the fisher candidates' weights (load_fisher_weights), or None and why there are none."""
        if osf_layers(model):  # ewc's Fisher is of the trained tensors: U_low, S_low, V_low, not the weights' entries
            return None, f"under OSF {RUN_FISHER} weighs U_low, S_low, V_low, not the entries of the weight change"
        return load_fisher_weights(path, self.names, self.params), NO_FISHER

    def set(self, values: Values) -> None:
        """Put a candidate's values into the interpolated tensors."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, values)


class Search:
    """Measures the candidates of one Merge (module docstring) and keeps their rows and how to rebuild each."""

    def __init__(self, merge: Merge, model: nn.Module, evaluate: Callable[[nn.Module], dict], delta: Values) -> None:
        self.merge, self.model, self.evaluate, self.delta = merge, model, evaluate, delta
        self.config = merge.config
        self.rows: list[dict[str, Any]] = []
        self.values: dict[str, Callable[[], Values]] = {}
        self.metrics: dict[str, dict[str, Any]] = {}

    def measure(self, name: str, method: str, alpha: float, values: Callable[[], Values], **extra: Any) -> dict:
        if name not in self.values:
            self.merge.set(values())
            metrics = self.evaluate(self.model)
            self.rows.append({"candidate": name, "method": method, "alpha": alpha, **extra, **summary(metrics)})
            self.values[name], self.metrics[name] = values, metrics
        return next(r for r in self.rows if r["candidate"] == name)

    def run(self, fisher: Values | None, why_no_fisher: str = NO_FISHER) -> dict[str, Any]:
        cfg, start, delta = self.config, self.merge.start, self.delta
        for a in cfg.alphas:
            self.measure(f"global {a:g}", "global", a, lambda a=a: scaled(start, delta, [a] * len(delta)))
        notes: dict[str, Any] = {}
        if self.merge.depth:
            notes["layer_alphas"] = self.search_layers()
        for d in cfg.densities:
            sparse = {"dare": lambda d=d: dare(delta, d, cfg.seed), "ties": lambda d=d: [ties([t], d) for t in delta]}
            for method, make in sparse.items():
                for a in (a for a in cfg.alphas if a > 0):
                    build = lambda make=make, a=a: scaled(start, make(), [a] * len(delta))  # noqa: E731
                    self.measure(f"{method} {d:g} x {a:g}", method, a, build, density=d)
        if fisher is None:
            notes["fisher"] = why_no_fisher
        for lam in cfg.fisher_scales if fisher is not None else []:
            weights = [lam / (lam + f) for f in fisher]
            self.measure(f"fisher {lam:g}", "fisher", 1.0, lambda w=weights: scaled(start, delta, w), scale=lam)
        return notes

    def search_layers(self) -> list[float]:
        """Coordinate search over per-depth alphas from the chosen global one (module docstring)."""
        cfg, start, delta, depth = self.config, self.merge.start, self.delta, self.merge.depth
        globals_ = [r for r in self.rows if r["method"] == "global"]
        best_target = min(r["val_loss"] for r in globals_)
        chosen = pick(globals_, cfg.choose, cfg.tolerance)

        def score(row: dict[str, Any]) -> tuple[int, float]:
            if cfg.choose == "best_target" or "reference_loss" not in row:
                return 0, row["val_loss"]
            inside = within_tolerance([row], lambda r: r["val_loss"], cfg.tolerance, reference=best_target)
            return (0, row["reference_loss"]) if inside else (1, row["val_loss"])

        alphas = [chosen["alpha"]] * (max(depth) + 1)
        best, used = score(chosen), 0
        for trial in coordinate_moves(alphas, cfg.alphas):
            if used >= cfg.search_evaluations:
                break
            name = "layers " + ",".join(f"{a:g}" for a in trial)
            weights = [trial[d] for d in depth]
            used += name not in self.values
            row = self.measure(name, "layers", sum(trial) / len(trial), lambda w=weights: scaled(start, delta, w))
            row["layer_alphas"] = trial
            if score(row) < best:
                best = score(row)
                alphas[:] = trial
        return alphas


def coordinate_moves(alphas: list[float], grid: list[float]) -> Iterator[list[float]]:
    """Trials of a coordinate search: each position in turn takes each other grid value, from the current point
    (`alphas`, which the caller updates in place when a trial is kept); passes repeat until one keeps nothing."""
    while True:
        before = list(alphas)
        for d in range(len(alphas)):
            for value in grid:
                if value != alphas[d]:
                    yield [*alphas[:d], value, *alphas[d + 1 :]]
        if alphas == before:
            return


def scaled(start: Values, delta: Values, weights: list[float] | Values) -> Values:
    """theta_0 + w * delta, per tensor (w a number or a tensor of per-entry weights), in each tensor's dtype."""
    return [(s.float() + w * d.float()).to(s.dtype) for s, d, w in zip(start, delta, weights)]


def dare(delta: Values, density: float, seed: int) -> Values:
    """DARE: each entry kept with probability `density` and divided by it (E[result] = delta), seeded."""
    out = []
    for i, d in enumerate(delta):
        generator = torch.Generator(device=d.device).manual_seed(seed * 1_000_003 + i)
        keep = torch.bernoulli(torch.full_like(d, density, dtype=torch.float32), generator=generator)
        out.append(d.float() * keep / density)
    return out


def ties(deltas: Values, density: float) -> torch.Tensor:
    """TIES-merging of several deltas of one tensor: each trimmed to its top `density` share of entries by
    magnitude (int(density * numel), as PEFT counts), the sign elected by the sum of the trimmed deltas, then the
    mean of the entries that agree with it (zero where none does)."""
    trimmed = []
    for d in deltas:
        flat = d.float().flatten()
        k = int(density * flat.numel())
        kept = torch.zeros_like(flat)
        top = flat.abs().topk(k).indices
        kept[top] = flat[top]
        trimmed.append(kept.view_as(d))
    stacked = torch.stack(trimmed)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def layer_depths(model: nn.Module, params: Values) -> list[int]:
    """Each tensor's depth (llrd's: embeddings 0, block i at i + 1, the head last), renumbered 0..n-1 over the
    depths present; [] when the model has no list of blocks or the tensors sit at one depth (the layer search is then
    left out: it would repeat the global alphas)."""
    try:
        by_id, _ = depths(model)
    except ConfigError:
        return []
    present = sorted({by_id[id(p)] for p in params})
    return [present.index(by_id[id(p)]) for p in params] if len(present) > 1 else []


def load_fisher_weights(path: Path, names: list[str], params: Values) -> Values | None:
    """F / mean(F) of the run's Fisher for each tensor (zeros for tensors it lacks: parameters loading initialized),
    None without the file."""
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    fisher = [loaded[n].to(p.device) if n in loaded else torch.zeros_like(p, dtype=torch.float32) for n, p in
              zip(names, params)]  # fmt: skip
    for n, f, p in zip(names, fisher, params):
        if f.shape != p.shape:
            raise ConfigError(f"merge: {path} holds {n} in shape {tuple(f.shape)}, the model {tuple(p.shape)}")
    mean = sum(f.sum().item() for f in fisher) / max(sum(f.numel() for f in fisher), 1)
    return [f / mean for f in fisher] if mean > 0 else fisher


def plot(rows: list[dict[str, Any]], chosen: dict[str, Any], path: Path) -> None:
    """merge.png: every candidate's target loss against forgetting, one series per method, the chosen one named."""
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r["method"], []).append(r)
    for method, rs in series.items():
        series[method] = sorted(rs, key=lambda r: r["val_loss"])
    title = "merge: theta_0 + w * delta per candidate (global: WiSE-FT)"
    plot_front(series, lambda r: f"{r['candidate']} (chosen)" if r is chosen else "", title, path, joined={"global"})
