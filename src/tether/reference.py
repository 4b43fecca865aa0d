"""The frozen reference: the original model's logits for a batch, for the regularizers that compare with it.

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
own predictions), and its logits are cached for the batch: a second regularizer asking about the same input_ids
tensor gets the cached logits. The stack clears the cache after every optimizer step.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from tether.config import Section
from tether.errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_TOKENS = 8  # length of the probe sequence that tells a fresh adapter from a trained one


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
    """The original model's logits for a batch, computed once per batch under no_grad and shared."""

    def __init__(self, model: nn.Module, mode: str, frozen: nn.Module | None = None,
                 adapter: dict[str, torch.Tensor] | None = None, offload: bool = False) -> None:  # fmt: skip
        self.model = model
        self.mode = mode
        """disable, clone or copy (see the module docstring)."""
        self.frozen = frozen
        self.adapter = adapter
        self.offload = offload
        self.forwards = 0
        """Reference forwards run so far (the cache saves the others)."""
        self._inputs: tuple[torch.Tensor, int] | None = None
        self._logits: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, options: ReferenceOptions) -> Reference:
        """A reference to `model` as it is now; call it before training changes the model."""
        peft = is_peft(model)
        if peft and (options.dtype is not None or options.offload):
            raise ConfigError(
                "reference.dtype / reference.offload apply to the frozen copy of full fine-tuning; under LoRA the "
                "reference is the same model: remove them"
            )
        if not peft:
            if options.adapter != "auto":
                raise ConfigError("reference.adapter applies under LoRA only: remove it for full fine-tuning")
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

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The reference's logits for this batch (no grad), from the cache when the batch was seen this step."""
        ids = inputs["input_ids"]
        # The cache keeps the tensor itself: while it is alive its id cannot be reused by a later batch.
        if self._inputs is not None and self._inputs[0] is ids and self._inputs[1] == ids._version:
            return self._logits
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}  # no loss to compute
        with torch.no_grad():
            logits = self._forward(model_inputs)
        self.forwards += 1
        self._inputs, self._logits = (ids, ids._version), logits
        return logits

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
        """Drop the cached logits once every regularizer has read them (a batch x tokens x vocab tensor)."""
        self._inputs = self._logits = None

    def _forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        if self.mode == "copy":
            device = inputs["input_ids"].device
            if self.offload:
                self.frozen.to(device)
            try:
                return self.frozen(**inputs).logits
            finally:
                if self.offload:
                    self.frozen.to("cpu")
        with evaluating(self.model):
            if self.mode == "disable":
                with self.model.disable_adapter():
                    return self.model(**inputs).logits
            return torch.func.functional_call(self.model, self.adapter, args=(), kwargs=inputs).logits


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
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    probe = torch.arange(1, PROBE_TOKENS + 1, device=device).remainder(vocab)[None]
    with torch.no_grad(), evaluating(model):
        adapted = model(input_ids=probe).logits.float()
        with model.disable_adapter():
            base = model(input_ids=probe).logits.float()
    return not torch.allclose(adapted, base, rtol=1e-4, atol=1e-5)
