"""EWC: lambda/2 * sum F * (theta - theta_0)^2 with a diagonal Fisher F estimated on the reference data at setup.

The Fisher tether estimates (every estimator targets this normalization):

    F = 1/N * sum_n (d l_n / d theta)^2,   l_n = mean NLL over the labelled tokens of reference row n

so a row counts once whatever its length (for classification l_n is the row's cross-entropy). Estimators:
  sampled    (default) the label of every labelled position is drawn from the model's own predictive distribution
             (teacher-forced: the inputs stay the data's tokens): the true Fisher, the curvature EWC's Laplace
             approximation asks for. Sampled-label gradients have zero
             mean, so the squared gradient of a batch's summed loss, (sum_n g_n)^2, is an unbiased estimate of
             sum_n g_n^2: one forward and backward per reference batch.
  empirical  the true labels, each row's gradient squared on its own (one forward and backward per row, padding
             cut away): the empirical Fisher. Squaring a batch's summed gradient instead would add the cross terms
             g_n * g_m, which do not vanish for true labels. The empirical Fisher can point the wrong way
             (Kunstner et al., 2019).
  exact      the same per-row empirical Fisher computed with torch.func (vmap over rows of equal length): faster
             on small models, memory grows with rows x parameters: for small models or LoRA.
Batches are forwarded in eval mode (no dropout); the gradients never touch p.grad.

Only trainable tensors are included (the adapters and head under LoRA). The Fisher is always fp32. `normalize`
divides it by its mean, so that one lambda transfers between models and data sizes. Every run writes the raw
(un-normalized) Fisher it used to RUN_DIR/fisher.safetensors, keyed by parameter name (and to `save_path` when set);
a resumed run loads it from there instead of estimating again. `fisher_path` loads such a file instead of
estimating, and `online` adds a new estimate to it: F <- decay * F_loaded + F_new (online EWC, Schwarz et al., 2018).

With several processes each estimates on its own share of the reference batches and the sums are all-reduced; the
sampled labels of a batch come from a generator seeded by the batch's tokens, so the Fisher is the single-process
one (up to float summation order) however the batches are spread. Only the main process writes the file.

Under FSDP2 the anchor and the Fisher are sharded like the parameters. The gradients only exist reduced across
processes there, so every process runs every reference batch and squares its shard of the batch's gradient (the
same Fisher as one process; the pass is not split). The file is gathered one tensor at a time onto the main process.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tether.data import IGNORE
from tether.distributed import gather_like, has_sharded_parameters, is_main_process, shard_like, sum_across_processes
from tether.errors import ConfigError
from tether.outputs import save_safetensors_atomic
from tether.regularizers.anchor import (
    add_pull,
    global_sums,
    loss_gradients,
    quadratic_value,
    scratch,
    scratch_bytes,
    shards,
    snapshot,
    trainable,
)
from tether.regularizers.base import Regularizer, RegularizerConfig, RunFacts, SetupContext, nbytes, register

Batch = dict[str, torch.Tensor]
SAMPLING_SEED = 0  # the sampled estimator draws its labels from its own generators, so a run repeats exactly
RUN_FISHER = "fisher.safetensors"  # in the run directory
MISSING_FISHER = "does not exist: give the file an earlier run wrote with ewc.save_path"


class EWCConfig(RegularizerConfig):
    strength: float = Field(0.3, ge=0)
    """lambda; with normalize (mean F = 1), 0.1-1 (the demo task: 0.1-1 keep the facts, 10 slows learning)."""
    estimator: Literal["sampled", "empirical", "exact"] = "sampled"
    """sampled: the true Fisher (labels drawn from the model); empirical: true labels, per row; exact: the same per-row
    empirical Fisher vectorized with torch.func (small models or LoRA)."""
    normalize: bool = True
    """Divide F by its mean over all entries, so that lambda does not depend on the model or the loss scale."""
    fisher_path: str | None = None
    """A Fisher saved by an earlier run (save_path): used instead of estimating one (or combined with a new one)."""
    online: bool = False
    """With fisher_path: estimate a new Fisher on the reference data too and use decay * loaded + new."""
    decay: float = Field(0.9, gt=0, le=1)
    """Online EWC: weight of the loaded (older) Fisher."""
    save_path: str | None = None
    """Write the Fisher used (before normalize) here as safetensors, for a later run's fisher_path."""
    data: str | None = None
    """Data to estimate the Fisher on (JSONL file, save_to_disk directory or hub id, read in the reference data's
    format); None: the rows of data.reference held out of the measurement (evaluation.reference_holdout)."""

    def without_reference_data(self) -> str | None:
        if (self.fisher_path is not None and not self.online) or self.data is not None:
            return None
        need = "for online ewc" if self.online else "or set ewc.fisher_path to a Fisher saved by an earlier run"
        return f"ewc estimates its Fisher on the reference data: set data.reference {need}"

    def check_run(self, run: RunFacts) -> str | None:
        if self.fisher_path is not None and not Path(self.fisher_path).is_file():
            return f"ewc.fisher_path: {self.fisher_path} {MISSING_FISHER}"
        return super().check_run(run)


@register("ewc", EWCConfig)
class EWC(Regularizer):
    touches_parameters = True

    def __init__(self, config: EWCConfig) -> None:
        self.config = config
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        self.views: list[torch.Tensor] | None = None
        self.scale = 1.0  # mean(F) with normalize: the weights are F / scale
        self.weights: list[torch.Tensor] = []
        """The per-entry weights of the penalty, fp32: F, or F / mean(F) with normalize (all the Fisher kept)."""

    def setup(self, ctx: SetupContext) -> None:
        named = trainable(ctx.model, ctx.new_parameters)
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.anchors = snapshot(self.params)
        self.views = scratch(self.params)
        kept = ctx.output_dir / RUN_FISHER if ctx.output_dir is not None else None
        fisher = load_fisher(kept, named) if kept is not None and kept.is_file() else self._fisher(ctx, named)
        for path in (kept, self.config.save_path):
            if path is not None:
                save_fisher(path, dict(zip(self.names, fisher)), self.config.estimator, self.params)
        self.scale = mean_of(fisher, self.params) if self.config.normalize else 1.0
        torch._foreach_div_(fisher, self.scale)  # in place: a full-size fp32 Fisher is the largest thing ewc holds
        self.weights = fisher

    def memory(self) -> dict[str, int]:
        held = nbytes(self.anchors), nbytes(self.weights), scratch_bytes(self.views)
        return dict(zip(("anchor", "Fisher", "work buffer"), held))

    @property
    def fisher(self) -> list[torch.Tensor]:
        """The Fisher as estimated or loaded (before normalize)."""
        return torch._foreach_mul(self.weights, self.scale)

    def _fisher(self, ctx: SetupContext, named: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
        cfg = self.config
        loaded = load_fisher(cfg.fisher_path, named) if cfg.fisher_path is not None else None
        if loaded is not None and not cfg.online:
            return loaded
        source = ctx.reference_batches if cfg.data is None else ctx.read_batches(cfg.data, "ewc.data")
        if source is None:
            raise ConfigError(cfg.without_reference_data())
        sharded = has_sharded_parameters(ctx.model)
        if sharded and cfg.estimator == "exact":
            raise ConfigError("ewc.estimator: exact (per-row torch.func) cannot run on FSDP: use sampled or empirical")
        what = "the reference data" if cfg.data is None else cfg.data
        advance = ctx.progress(f"ewc: {cfg.estimator} Fisher on {what}", None) if ctx.progress else None
        batches = source(shard=not sharded)  # FSDP: every process runs every batch (module docstring)
        new = estimate_fisher(ctx.model, named, batches, cfg.estimator, advance)
        return new if loaded is None else torch._foreach_add(torch._foreach_mul(loaded, cfg.decay), new)

    def save(self, path: str | Path) -> None:
        """Write the raw Fisher as safetensors, keyed by parameter name."""
        save_fisher(path, dict(zip(self.names, self.fisher)), self.config.estimator, self.params)

    def penalty_grad(self, scale: float) -> None:
        add_pull(self.params, self.anchors, self.weights, scale, self.views)

    def penalty_value(self) -> torch.Tensor | None:
        return quadratic_value(self.params, self.anchors, self.weights) if self.params else None


def mean_of(fisher: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    """mean(F) over every entry of every tensor (of every shard: the parameters give the whole sizes)."""
    mean = global_sums(fisher, params).sum().item() / sum(p.numel() for p in params)
    if not mean > 0:
        raise ConfigError("ewc.normalize: the Fisher is zero everywhere (no gradient on the reference data)")
    return mean


def per_example_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each row: the mean NLL over its labelled tokens (causal LM, labels shifted by one as in HF), or the
    cross-entropy of its class (sequence classification, labels of shape [batch])."""
    if labels.ndim == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) / (labels != IGNORE).sum(1).clamp(min=1)


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's predictive distribution at every labelled position (the others stay -100)."""
    with torch.no_grad():
        if labels.ndim == 1:
            return torch.multinomial(logits.float().softmax(-1), 1, generator=generator).squeeze(1)
        mask = labels[:, 1:] != IGNORE
        probs = logits[:, :-1][mask].float().softmax(-1)  # only the labelled positions: vocab x tokens can be large
        sampled = labels.clone()
        sampled[:, 1:][mask] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return sampled


def estimate_fisher(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batches: Iterable[Batch],
    estimator: str,
    advance: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """The diagonal Fisher of the named parameters on `batches` (see the module docstring), fp32; with several
    processes, over every process's batches."""
    params = [p for _, p in named]
    sharded = has_sharded_parameters(model)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in shards(params)]
    rows, was_training = torch.zeros((), device=params[0].device), model.training
    model.eval()
    try:
        for batch in batches:
            rows += batch["input_ids"].shape[0]
            if estimator == "exact":
                torch._foreach_add_(sums, per_row_squares(model, named, batch))
            elif estimator == "empirical":
                for row in unpadded_rows(batch):
                    grads = loss_gradients(
                        model, per_example_nll(model(**model_inputs(row)).logits, row["labels"]), params
                    )
                    torch._foreach_addcmul_(sums, grads, grads)
            else:
                grads = batch_gradient(model, params, batch, batch_generator(batch["input_ids"]))
                torch._foreach_addcmul_(sums, grads, grads)
            if advance is not None:
                advance(1)
    finally:
        model.train(was_training)
    if not sharded:  # sharded: every process ran every batch on its shard
        sum_across_processes([*sums, rows])
    if rows.item() == 0:
        raise ConfigError("ewc: the reference data yielded no batch: check data.reference")
    return torch._foreach_div(sums, rows.item())


def batch_generator(input_ids: torch.Tensor) -> torch.Generator:
    """The sampled labels' generator, seeded by the batch's tokens: the same batch draws the same labels whatever
    process it lands on and whatever came before it."""
    seed = zlib.crc32(input_ids.cpu().numpy().tobytes(), SAMPLING_SEED)
    return torch.Generator(input_ids.device).manual_seed(seed)


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


def unpadded_rows(batch: Batch) -> Iterator[Batch]:
    """Each row of a collated batch as a batch of one, its padding cut away (the row's own tokens, in place)."""
    mask = batch["attention_mask"].bool()
    for i in range(mask.shape[0]):
        yield {
            k: v[i : i + 1, mask[i]] if v.ndim == 2 and v.shape == mask.shape else v[i : i + 1]
            for k, v in batch.items()
        }


def batch_gradient(
    model: nn.Module, params: list[torch.Tensor], batch: Batch, generator: torch.Generator
) -> list[torch.Tensor]:
    """d/dtheta of the batch's summed per-row loss with labels sampled from the model, in fp32. Sampled labels give
    zero-mean row gradients, independent across rows, so the cross terms of its square vanish in expectation."""
    logits = model(**model_inputs(batch)).logits
    labels = sample_labels(logits, batch["labels"], generator)
    return loss_gradients(model, per_example_nll(logits, labels).sum(), params)


def per_row_squares(model: nn.Module, named: list[tuple[str, nn.Parameter]], batch: Batch) -> list[torch.Tensor]:
    """sum over the batch's rows of each row's squared gradient, with torch.func. Rows are grouped by length and
    their padding cut away, so no model sees an attention mask that vmap would have to branch on."""
    from torch.func import functional_call, grad, vmap

    def row_loss(p: Batch, row_ids: torch.Tensor, row_labels: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": row_ids[None], "attention_mask": ones}).logits
        return per_example_nll(logits, row_labels[None])[0]

    params = {n: p.detach() for n, p in named}
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    out = [torch.zeros_like(p, dtype=torch.float32) for p in params.values()]
    for length in lengths.unique().tolist():
        rows = lengths == length
        ids = batch["input_ids"][rows][mask[rows]].view(-1, length)
        labels = batch["labels"][rows]
        if labels.ndim == 2:
            labels = labels[mask[rows]].view(-1, length)
        ones = torch.ones(1, length, dtype=batch["attention_mask"].dtype, device=ids.device)
        with warnings.catch_warnings():  # "no batching rule for SDPA on CPU, falling back to a loop": nothing to do
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads = vmap(grad(row_loss), in_dims=(None, 0, 0, None))(params, ids, labels, ones)
        torch._foreach_add_(out, [grads[n].float().square().sum(0) for n in params])
    return out


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], estimator: str, params: list[torch.Tensor]) -> None:
    """Write {parameter name: Fisher} as safetensors from the main process, atomically (a reader sees the old file or
    the new one). Shards are gathered one tensor at a time, every process taking part; only the main one keeps them."""
    tensors = {}
    for (name, f), p in zip(fisher.items(), params):
        whole = gather_like(f, p)
        if is_main_process():
            tensors[name] = whole.float().cpu()
    if is_main_process():
        save_safetensors_atomic(tensors, Path(path), {"format": "tether-fisher", "estimator": estimator})


def load_fisher(path: str | Path, named: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """The Fisher in `path`, aligned with `named` (fp32, on each parameter's device); ConfigError on any mismatch."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"ewc.fisher_path: {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} {MISSING_FISHER}")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{where} is not a safetensors file ({e}): give a file written by ewc.save_path") from None
    names = [n for n, _ in named]
    missing, extra = [n for n in names if n not in loaded], sorted(set(loaded) - set(names))
    if missing or extra:
        example = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ConfigError(
            f"{where} does not match this model's trainable parameters ({len(missing)} missing, {len(extra)} "
            f"unexpected, e.g. {example}): it was saved for another model or other trainable parameters (LoRA or "
            "not); estimate a new one by removing fisher_path"
        )
    for n, p in named:
        if loaded[n].shape != p.shape:
            raise ConfigError(
                f"{where}: {n} has shape {tuple(loaded[n].shape)} in the file but {tuple(p.shape)} in the model: "
                "it was saved for another model; estimate a new one by removing fisher_path"
            )
    return [shard_like(loaded[n].to(device=p.device, dtype=torch.float32), p) for n, p in named]
