"""The frozen reference: the original model's logits at a batch's loss positions, for the regularizers that compare
with it.

One Reference serves every regularizer of a run (distill and kl together). It is built by the stack at setup, before
any optimizer step, in the cheapest form that is still the original model:

  disable  LoRA on an adapter this run created: the same model with its adapters disabled (`disable_adapter()`).
           No weight is copied.
  clone    LoRA on an adapter trained before this run (loaded, or initialised away from zero as PiSSA does):
           disabling it would compare with the base model, not the original one. The trainable tensors (the
           adapter, a classification head) are cloned, frozen, and swapped in for the reference forward with
           torch.func.functional_call. The copy is the adapter's size. (PEFT's set_adapter would also flip
           requires_grad of the adapter being trained in the middle of a step, so tether does not switch adapters.)
  copy     full fine-tuning: a frozen deep copy of the model, optionally in a lower dtype and/or kept on the CPU
           and moved to the model's device for each reference forward (offload).

Under LoRA, `adapter: auto` picks disable when disabling the adapters leaves the outputs of a short probe sequence
unchanged at setup (a fresh adapter adds exactly zero), and clone otherwise.

The reference forward runs under torch.no_grad() in eval mode (no dropout, no NEFTune noise: the original model's
own predictions) and is shared: a second regularizer asking about the same input_ids tensor in the same step gets
the same logits (the stack clears them after the penalties). Two savings on top:
  - split: the model's body runs over the batch and its output layer only at the loss positions, when the body's
    last hidden states through the output embeddings give the model's own logits on a probe at setup (not so for
    soft-capped logits or classification heads: there the whole model runs and its logits are gathered);
  - the row cache (`cache_mb`): the original model is frozen and deterministic, so what it gives on a row is fixed.
    Its output at a row's loss positions (the last hidden states with the split, else the logits) is kept in host
    memory, keyed by the row's content: tokens, mask and labels up to the row's last real token (trailing padding
    changes no earlier output of a causal model, nor any output of a masked encoder). A row met again, in a later
    epoch and in any batch, costs no forward: only rows not seen before run through the model. Small data trained
    for several epochs then pays one reference forward per row, not one per row and epoch. Rows are added until
    the cache is full; those that do not fit run every time.
Neither applies under FSDP2 or DeepSpeed ZeRO-3: every process must make the same module calls together (the
weights are gathered collectively as modules run), so the reference runs the whole model on every batch. The
reference's calls run under the caller's autocast: the trainer gives them the run's mixed precision, which
Accelerate applies to the model's own forward only.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tether.data import IGNORE
from tether.distributed import gathers_per_module, has_sharded_parameters
from tether.errors import ConfigError
from tether.section import Section

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_TOKENS = 8  # length of the probe sequence that tells a fresh adapter from a trained one
MB = 2**20


class ReferenceOptions(Section):
    """How the frozen reference is kept; the `reference:` field of the regularizers that use it."""

    adapter: Literal["auto", "disable", "clone"] = "auto"
    """LoRA only. disable: the model with its adapters disabled (an adapter this run created); clone: frozen copies
    of the adapter's tensors at setup (an adapter trained before this run); auto: disable if that leaves the outputs
    unchanged at setup, else clone."""
    dtype: Literal["bfloat16", "float16"] | None = None
    """Full fine-tuning only: keep the frozen copy in this dtype (half the memory of an fp32 copy; its logits are
    rounded to it). None: the model's dtype."""
    offload: bool = False
    """Full fine-tuning only: keep the frozen copy on the CPU and move it to the model's device for each reference
    forward (saves accelerator memory, costs one transfer of the weights per batch)."""
    cache_mb: int = Field(1024, ge=0)
    """Host memory (MB) for the reference's outputs on rows already seen: a row met again costs no forward. A loss
    token takes hidden_size values (vocabulary size for classification heads and soft-capped logits). 0: off."""

    def conflict(self, lora: bool) -> str | None:
        """What to change when these options do not apply to the run's kind of fine-tuning (None: they do)."""
        if lora and (self.dtype is not None or self.offload):
            return (
                "reference.dtype / reference.offload apply to the frozen copy of full fine-tuning; under LoRA the "
                "reference is the same model: remove them"
            )
        if not lora and self.adapter != "auto":
            return "reference.adapter applies under LoRA only: remove it for full fine-tuning"
        return None


def merge_options(options: list[ReferenceOptions]) -> ReferenceOptions:
    """The one set of options of a run: those that differ from the defaults, which must agree where given twice."""
    given = [o for o in options if o != ReferenceOptions()]
    if any(o != given[0] for o in given[1:]):
        raise ConfigError(
            "the regularizers that use the reference (distill, kl) set different `reference:` options: "
            "give them the same options, or set them on one of them only"
        )
    return given[0] if given else ReferenceOptions()


class Reference:
    """The original model's logits at a batch's loss positions, computed once per batch under no_grad and shared."""

    def __init__(self, model: nn.Module, mode: str, frozen: nn.Module | None = None,
                 adapter: dict[str, torch.Tensor] | None = None, offload: bool = False) -> None:  # fmt: skip
        self.model = model
        self.mode = mode
        """disable, clone or copy (see the module docstring)."""
        self.frozen = frozen
        self.adapter = adapter
        self.offload = offload
        self.split = False
        """Whether the output layer runs apart from the body, at the loss positions only."""
        self.cache = RowCache(0)
        self.forwards = 0
        """Reference forwards run so far (the cache and the sharing between regularizers save the others)."""
        self._inputs: tuple[torch.Tensor, int] | None = None
        self._logits: TeacherLogits | None = None
        self._prefixes: dict[int, str] = {}

    @classmethod
    def build(cls, model: nn.Module, options: ReferenceOptions) -> Reference:
        """A reference to `model` as it is now; call it before training changes the model."""
        ref = cls._of(model, options)
        if not has_sharded_parameters(model):  # FSDP2: only the whole model's forward gathers the shards
            ref.cache = RowCache(options.cache_mb * MB)
            ref.split = ref.splits_exactly()
        return ref

    @classmethod
    def _of(cls, model: nn.Module, options: ReferenceOptions) -> Reference:
        peft = is_peft(model)
        message = options.conflict(peft)
        if message is not None:
            raise ConfigError(message)
        if not peft:
            device = "cpu" if options.offload else None
            frozen = frozen_copy(model, DTYPES.get(options.dtype or ""), device)
            return cls(model, "copy", frozen=frozen, offload=options.offload)
        mode = options.adapter
        if mode == "auto":
            mode = "clone" if adapter_changes_outputs(model) else "disable"
        if mode == "disable":
            return cls(model, "disable")
        adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return cls(model, "clone", adapter=adapter)

    def logits(self, inputs: dict[str, Any]) -> TeacherLogits:
        """The reference's logits at the batch's loss positions, without grad (see TeacherLogits). A second call with
        the same input_ids tensor (before clear()) returns the same object."""
        ids = inputs["input_ids"]
        # Kept with the tensor itself: while it is alive its id cannot be reused by a later batch.
        if self._inputs is not None and self._inputs[0] is ids and self._inputs[1] == ids._version:
            return self._logits
        # ZeRO-3 gathers each module's weights as it runs, with all processes together: the same calls everywhere.
        collective = gathers_per_module(self.model)
        split, cached = self.split and not collective, self.cache.capacity > 0 and not collective
        with torch.no_grad():
            features = self._at_loss_positions(inputs, split, cached)
        if split and self.offload:  # the output layer moves to the device once for all positions
            features = self._output_layer(features)
        head = self._output_layer if split and not self.offload else None
        self._inputs, self._logits = (ids, ids._version), TeacherLogits(features, head)
        return self._logits

    def memory(self) -> dict[str, int]:
        """Bytes this reference holds beyond the model: the frozen copy (on CPU with offload) or the cloned adapter."""
        if self.mode == "copy":
            held = {id(t): t for t in [*self.frozen.parameters(), *self.frozen.buffers()]}.values()
            where = " (CPU)" if self.offload else ""
            return {f"frozen copy{where}": sum(t.numel() * t.element_size() for t in held)}
        if self.mode == "clone":
            return {"cloned adapter": sum(t.numel() * t.element_size() for t in self.adapter.values())}
        return {}

    def clear(self) -> None:
        """Drop this batch's logits once every regularizer has read them."""
        self._inputs = self._logits = None

    def splits_exactly(self) -> bool:
        """Whether the body's last hidden states through the output embeddings give the model's own logits, on a
        short probe (False for classification heads, soft-capped or scaled logits: the whole model runs then)."""
        net = hf_model(self.frozen if self.mode == "copy" else self.model)
        if net.get_output_embeddings() is None or net.base_model is net:
            return False
        if getattr(net.config.get_text_config(), "final_logit_softcapping", None):  # near identity on a probe's logits
            return False
        probe = {"input_ids": probe_ids(self.model)}
        with torch.no_grad():
            whole, hidden = self._forward(probe, split=False), self._forward(probe, split=True)
            if hidden is None or hidden.shape[:-1] != whole.shape[:-1]:
                return False
            return torch.allclose(self._output_layer(hidden).float(), whole.float(), rtol=1e-4, atol=1e-5)

    def _at_loss_positions(self, inputs: dict[str, Any], split: bool, cached: bool) -> torch.Tensor:
        """What the body (split) or the whole model gives at the batch's loss positions: from the row cache for rows
        seen before, from one forward over the other rows."""
        keys = row_keys(inputs) if cached else [None] * len(inputs["labels"])
        todo = [i for i, key in enumerate(keys) if key not in self.cache]
        fresh = dict(zip(todo, self._rows(take_rows(inputs, todo), split))) if todo else {}
        for i in todo:
            self.cache.add(keys[i], fresh[i])
        device = inputs["input_ids"].device
        return torch.cat([fresh[i] if i in fresh else self.cache.rows[key].to(device) for i, key in enumerate(keys)])

    def _rows(self, inputs: dict[str, Any], split: bool) -> list[torch.Tensor]:
        """One forward over these rows; per row, its output at its loss positions."""
        labels = inputs["labels"]
        self.forwards += 1
        out = self._forward({k: v for k, v in inputs.items() if k != "labels"}, split)
        rows, cols = loss_positions(labels)
        per_row = torch.bincount(rows, minlength=len(labels)).tolist()
        return list(at_positions(out, rows, cols).split(per_row))

    def _forward(self, inputs: dict[str, Any], split: bool) -> torch.Tensor | None:
        """The whole model's logits, or with `split` the body's last hidden states (None if it gives none)."""
        with self._original(inputs["input_ids"].device) as net:
            if not split:
                return self._call(net, **inputs).logits
            out = self._call(hf_model(net).base_model, **inputs)
            return out.get("last_hidden_state") if isinstance(out, dict) else None

    @torch.no_grad()
    def _output_layer(self, hidden: torch.Tensor) -> torch.Tensor:
        head = hf_model(self.frozen if self.mode == "copy" else self.model).get_output_embeddings()
        if self.mode == "copy":
            with moved(head if self.offload else None, hidden.device):
                return head(hidden)
        if not any(p.requires_grad for p in head.parameters()):
            return head(hidden)  # not adapted, so the original's own (switching PEFT's adapters off walks the model)
        with self._original(hidden.device):
            return self._call(head, hidden)

    @contextmanager
    def _original(self, device: torch.device) -> Iterator[nn.Module]:
        """The original model, ready to call in eval mode: the frozen copy (moved to `device` for the call with
        offload), or the model with its adapters disabled (clone swaps tensors in _call)."""
        if self.mode == "copy":
            with moved(self.frozen if self.offload else None, device):
                yield self.frozen
            return
        with evaluating(self.model):
            if self.mode == "disable":
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    def _call(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """module(*args, **kwargs); for clone, with the frozen adapter tensors under `module` swapped in."""
        if self.mode != "clone":
            return module(*args, **kwargs)
        if id(module) not in self._prefixes:
            name = next(n for n, m in self.model.named_modules() if m is module)
            self._prefixes[id(module)] = f"{name}." if name else ""
        prefix = self._prefixes[id(module)]
        own = {n.removeprefix(prefix): t for n, t in self.adapter.items() if n.startswith(prefix)}
        return torch.func.functional_call(module, own, args, kwargs)


class TeacherLogits:
    """The reference's logits at a batch's loss positions, [positions, vocab] in `loss_positions` order, made on
    demand: teacher[a:b] runs the output layer on those positions only (with the split), so that a regularizer
    working chunk by chunk never holds all positions' logits. Holds the body's last hidden states (or the logits)."""

    def __init__(self, features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.features = features
        self.head = head

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, positions: slice) -> torch.Tensor:
        """A new tensor (the caller may change it in place)."""
        part = self.features[positions]
        return part.clone() if self.head is None else self.head(part)


class RowCache:
    """The reference's output at each cached row's loss positions, in host memory, by row_keys' digest; rows are
    added until `capacity` bytes are held."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.rows: dict[bytes, torch.Tensor] = {}

    def __contains__(self, key: bytes | None) -> bool:
        return key is not None and key in self.rows

    def add(self, key: bytes | None, values: torch.Tensor) -> None:
        size = values.numel() * values.element_size()
        if key is not None and key not in self.rows and self.used + size <= self.capacity:
            self.rows[key] = values.to("cpu", copy=True)  # a copy: not a view that keeps the whole batch alive
            self.used += size


def row_keys(inputs: dict[str, Any]) -> list[bytes | None]:
    """A digest per row of all that the reference's output at its loss positions depends on: every input of the row
    up to its last real token (attention_mask) or last label with loss, whichever is later (labels say which
    positions carry loss). None for every row when the batch holds anything that is not one tensor row per row, or
    an attention mask that is not [batch, tokens]."""
    n = len(inputs["labels"])
    if any(not isinstance(v, torch.Tensor) or v.ndim == 0 or len(v) != n for v in inputs.values()):
        return [None] * n
    if inputs.get("attention_mask") is not None and inputs["attention_mask"].ndim != 2:
        return [None] * n
    cpu = {name: inputs[name].cpu() for name in sorted(inputs)}
    width = cpu["input_ids"].shape[1]
    ends = torch.full((n,), width) if "attention_mask" not in cpu else last_true(cpu["attention_mask"] != 0)
    if cpu["labels"].ndim == 2:
        ends = torch.maximum(ends, last_true(cpu["labels"] != IGNORE))
    keys = []
    for i, end in enumerate(ends.tolist()):
        digest = hashlib.blake2b(digest_size=16)
        for name, values in cpu.items():
            row = values[i][:end] if values.ndim > 1 and values.shape[1] == width else values[i]
            digest.update(f"{name}{tuple(row.shape)}{row.dtype}".encode())
            digest.update(row.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        keys.append(digest.digest())
    return keys


def last_true(flags: torch.Tensor) -> torch.Tensor:
    """Per row of a [rows, tokens] bool tensor, 1 + the index of its last True (0 for a row without one)."""
    width = flags.shape[1]
    return torch.where(flags.any(1), width - flags.flip(1).int().argmax(1), 0)


def take_rows(inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The batch restricted to `rows` (the batch itself when that is all of them)."""
    if len(rows) == len(inputs["labels"]):
        return inputs
    index = torch.tensor(rows, device=inputs["input_ids"].device)
    return {name: values[index] for name, values in inputs.items()}


def loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """Which logits carry loss: [batch, tokens - 1] for causal LM (logits[:, t] predicts labels[:, t + 1]), [batch]
    for class labels. The penalties and the trainer's weighting of them count positions by it."""
    return labels[:, 1:] != IGNORE if labels.ndim > 1 else labels != IGNORE


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the logits that carry loss (loss_mask); column 0 for class labels [batch]."""
    mask = loss_mask(labels)
    if labels.ndim == 1:
        rows = mask.nonzero().squeeze(1)
        return rows, torch.zeros_like(rows)
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


def at_positions(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """values[rows, cols] for per-token values [batch, tokens, ...]; values[rows] for per-row ones [batch, classes]."""
    return values[rows] if values.ndim == 2 else values[rows, cols]


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_peft(model) else model


@contextmanager
def moved(module: nn.Module | None, device: torch.device) -> Iterator[None]:
    """`module` on `device` inside, back on the CPU after (nothing moves for None)."""
    if module is None:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


def probe_ids(model: nn.Module) -> torch.Tensor:
    """A short fixed token sequence [1, PROBE_TOKENS] on the model's device."""
    device = next(model.parameters()).device
    vocab = hf_model(model).config.get_text_config().vocab_size  # PEFT may wrap the embeddings (trainable tokens)
    return torch.arange(1, PROBE_TOKENS + 1, device=device).remainder(vocab)[None]


def frozen_copy(model: nn.Module, dtype: torch.dtype | None, device: str | None) -> nn.Module:
    """A frozen eval-mode deep copy whose tensors are made directly in `dtype` (floating ones) and on `device`: no
    transient full-precision or on-device copy. Tied weights stay tied (one clone per tensor)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            kind = dtype if dtype is not None and t.is_floating_point() else t.dtype
            clone = t.detach().to(device=device, dtype=kind, copy=True)
            memo[id(t)] = nn.Parameter(clone, requires_grad=False) if isinstance(t, nn.Parameter) else clone
    return copy.deepcopy(model, memo).eval()


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own mode restored after (a model may hold modules in either)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def is_peft(model: nn.Module) -> bool:
    if "peft" not in sys.modules:  # no PEFT imported, so no PEFT model can exist: skip its slow import
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_changes_outputs(model: nn.Module) -> bool:
    """Whether the model's adapters change its logits now, on a short probe sequence (a fresh LoRA adds zero)."""
    probe = probe_ids(model)
    with torch.no_grad(), evaluating(model):
        adapted = model(input_ids=probe).logits.float()
        with model.disable_adapter():
            base = model(input_ids=probe).logits.float()
    return not torch.allclose(adapted, base, rtol=1e-4, atol=1e-5)
