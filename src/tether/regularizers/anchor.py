"""What the pulls toward the pre-trained weights share (l2_sp, ewc, si): the anchor, the pull and its value.

The anchor theta_0 is a list of detached copies of the trainable tensors taken at setup, not a copy of the model.
Differences and sums are taken in fp32 so that bf16/fp16 weights do not lose the penalty to rounding.
Under FSDP2 every list here holds this process's shards (see tether.distributed): the anchor, the Fisher and the
importance are sharded with the parameters, and the values returned are this process's part of the sum.
"""

from __future__ import annotations

import torch
from torch import nn

from tether.distributed import has_sharded_parameters, is_sharded, local, sum_across_processes
from tether.regularizers.base import base_name, named_params_with_module


def trainable(model: nn.Module, new: frozenset[str] = frozenset()) -> list[tuple[str, nn.Parameter]]:
    """Every trainable tensor (biases and norms too: pulling them to their pre-trained values is harmless) except
    the `new` ones (SetupContext.new_parameters): a head that loading just initialized has no pre-trained value to be
    pulled toward (Li et al. 2018 leave new layers out of L2-SP)."""
    params = named_params_with_module(model)
    return [(n, p) for n, p, _ in params if p.requires_grad and base_name(n) not in new]


def shards(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors this process holds of the parameters (views of the local shards under FSDP2)."""
    return [local(p) for p in params]


def grad_shards(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters' gradients as this process holds them (views: adding to them adds to p.grad)."""
    return [local(p.grad) for p in params]


def snapshot(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """theta_0: detached copies of the parameters (of the local shards under FSDP2), in their own dtype unless
    `dtype` is given."""
    return [p.detach().to(dtype=dtype or p.dtype, copy=True) for p in shards(params)]


def loss_gradients(model: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params in fp32 (zeros where unused), without touching p.grad. Under FSDP2 the gradients only
    arrive in p.grad, reduced across processes: they are taken from there (this process's shards), so every
    process must have run the same batch, and p.grad is cleared again."""
    if not has_sharded_parameters(model):
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        return [g.float() for g in grads]
    loss.backward()
    grads = [torch.zeros_like(local(p), torch.float32) if p.grad is None else local(p.grad).float() for p in params]
    model.zero_grad(set_to_none=True)
    return grads


def global_sums(tensors: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum (fp32, stacked), over all of its shards when `params` are sharded: one all-reduce."""
    sums = torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    if any(is_sharded(p) for p in params):
        sum_across_processes([sums])
    return sums


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype differences and sums are taken in: fp32, or fp64 for fp64 weights (never below the weights')."""
    return torch.promote_types(dtype, torch.float32)


def accumulation_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """fp64 when any tensor is fp64, else fp32: the dtype of a value summed over all of them."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scratch(params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """On CPU, an fp32 view shaped like each parameter (of its local shard), all into one buffer the size of the
    largest; None on accelerators and for fp64 weights (an fp32 scratch would round their differences).

    The closed-form pulls run tensor by tensor on CPU with their intermediate in this buffer, which stays in the
    core's cache between the op that writes it and the op that reads it: the step then moves little more than
    theta, theta_0, the weights and the gradient once. Whole-model intermediates would be written out and read back
    (each pass over 1.3M floats costs ~0.3 ms here, as much as the arithmetic), and fresh ones would fault their
    pages in. Accelerators run fused multi-tensor kernels instead (a kernel per tensor would be launch-bound), whose
    temporaries their caching allocators reuse.
    """
    if not params or any(p.device.type != "cpu" or p.dtype == torch.float64 for p in params):
        return None
    local_shards = shards(params)
    buffer = torch.empty(max(p.numel() for p in local_shards), dtype=torch.float32)
    return [buffer[: p.numel()].view(p.shape) for p in local_shards]


def scratch_bytes(views: list[torch.Tensor] | None) -> int:
    """Bytes held by a scratch() list (its views share one buffer)."""
    return views[0].untyped_storage().nbytes() if views else 0


def with_grads(params: list[torch.Tensor], *aligned: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], ...]:
    """The parameters that got a gradient this step and the matching items of each aligned list (None stays)."""
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    if len(keep) == len(params):
        return (params, *aligned)
    return tuple(None if items is None else [items[i] for i in keep] for items in (params, *aligned))


def differences(params: list[torch.Tensor], anchors: list[torch.Tensor]) -> list[torch.Tensor]:
    """theta - theta_0 in fp32 (fp64 for fp64 weights), new tensors. bf16/fp16 weights are upcast before
    subtracting: the difference of two bf16 numbers may need more bits than bf16 holds."""
    if all(p.dtype == torch.float32 for p in params):
        return list(torch._foreach_sub(params, anchors))  # a lower-precision anchor is promoted exactly
    return [p.to(wide(p.dtype)) - a.to(wide(p.dtype)) for p, a in zip(params, anchors)]


def difference_into(out: torch.Tensor, param: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """theta - theta_0 written into the fp32 tensor `out` (upcast first, as in differences)."""
    if param.dtype == torch.float32:
        return torch.sub(param, anchor, out=out)
    return out.copy_(param).sub_(anchor)


def add_pull(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    weights: list[torch.Tensor] | None,
    scale: float,
    views: list[torch.Tensor] | None,
) -> None:
    """p.grad += scale * w * (theta - theta_0) for each parameter that got a gradient (w = 1 when weights is None):
    the gradient of scale * quadratic_value. Two passes: the difference (into `views` on CPU, see scratch), then
    one fused add into the gradient."""
    params, anchors, weights, views = with_grads(params, anchors, weights, views)
    if not params or not scale:
        return
    with torch.no_grad():
        thetas, grads = shards(params), grad_shards(params)
        if views is None:
            diffs = differences(thetas, anchors)
            if weights is None:
                torch._foreach_add_(grads, diffs, alpha=scale)
            else:
                torch._foreach_addcmul_(grads, diffs, weights, value=scale)
            return
        for i, (theta, anchor, grad) in enumerate(zip(thetas, anchors, grads)):
            diff = difference_into(views[i], theta, anchor)
            if weights is None:
                grad.add_(diff, alpha=scale)
            else:
                grad.addcmul_(diff, weights[i], value=scale)


def quadratic_value(
    params: list[torch.Tensor], anchors: list[torch.Tensor], weights: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """1/2 * sum w * (theta - theta_0)^2 over every tensor (this process's shards), fp32 (fp64 for fp64 weights) and
    detached. One tensor at a time: it runs when logs are written, and whole-model temporaries would raise the peak
    memory there."""
    total = torch.zeros((), dtype=accumulation_dtype(params), device=params[0].device)
    with torch.no_grad():
        for i, (theta, anchor) in enumerate(zip(shards(params), anchors)):
            squares = (theta.to(wide(theta.dtype)) - anchor.to(wide(theta.dtype))).square_()
            if weights is None:
                total += squares.sum()
            else:
                total += torch.dot(squares.flatten(), weights[i].flatten().to(squares.dtype))
    return 0.5 * total
