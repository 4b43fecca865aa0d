"""What the pulls toward the pre-trained weights share (l2_sp, ewc, si): the anchor and the fused quadratic pull.

The anchor theta_0 is a list of detached copies of the trainable tensors taken at setup, not a copy of the model.
Differences and sums are taken in fp32 so that bf16/fp16 weights do not lose the penalty to rounding.
Under FSDP2 every list here holds this process's shards (see tether.distributed): the anchor, the Fisher and the
importance are sharded with the parameters, and the values returned are this process's part of the sum.
"""

from __future__ import annotations

import torch
from torch import nn

from tether.distributed import has_sharded_parameters, is_sharded, local, sum_across_processes
from tether.regularizers.base import named_params_with_module


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every trainable tensor (biases and norms too: pulling them to their pre-trained values is harmless)."""
    return [(n, p) for n, p, _ in named_params_with_module(model) if p.requires_grad]


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


def work_buffers(params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """fp32 tensors shaped like `params` to compute in, kept from step to step on CPU only.

    On CPU a large temporary is fresh memory from the OS whose pages fault in on first touch, which costs as much as
    the arithmetic (1.4 ms vs 0.4 ms for an op over 1.3M floats). Accelerators' caching allocators reuse memory
    anyway, and buffers kept there would only raise the peak during the backward pass: None.
    """
    if not params or any(p.device.type != "cpu" for p in params):
        return None
    return [torch.empty_like(p, dtype=torch.float32) for p in shards(params)]


def with_grads(params: list[torch.Tensor], *aligned: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], ...]:
    """The parameters that got a gradient this step and the matching items of each aligned list (None stays)."""
    keep = [i for i, p in enumerate(params) if p.grad is not None]
    if len(keep) == len(params):
        return (params, *aligned)
    return tuple(None if items is None else [items[i] for i in keep] for items in (params, *aligned))


def differences(
    params: list[torch.Tensor], anchors: list[torch.Tensor], buffers: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """theta - theta_0 in fp32, in `buffers` when given. bf16/fp16 weights are upcast before subtracting: the
    difference of two bf16 numbers may need more bits than bf16 holds."""
    if buffers is not None:
        torch._foreach_copy_(buffers, params)
        torch._foreach_sub_(buffers, anchors)
        return buffers
    if all(p.dtype == torch.float32 for p in params):
        return list(torch._foreach_sub(params, anchors))  # a lower-precision anchor is promoted exactly
    return [p.float() - a.float() for p, a in zip(params, anchors)]


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(x^2) over a list of tensors, accumulated in fp32."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


def quadratic_pull(
    params: list[torch.Tensor],
    anchors: list[torch.Tensor],
    roots: list[torch.Tensor],
    scale: float,
    buffers: list[torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """1/2 * sum w * (theta - theta_0)^2 (fp32, detached), and scale * w * (theta - theta_0) added to each p.grad.

    Takes roots = sqrt(w) of the non-negative fp32 weights (the Fisher, SI's Omega): u = sqrt(w) * (theta - theta_0)
    gives the value as ||u||^2 and the gradient as sqrt(w) * u with a single work list. Only parameters that got a
    gradient take part.
    """
    params, anchors, roots, buffers = with_grads(params, anchors, roots, buffers)
    if not params:
        return None
    with torch.no_grad():
        scaled = differences(shards(params), anchors, buffers)
        torch._foreach_mul_(scaled, roots)
        value = 0.5 * sum_of_squares(scaled)
        if scale:
            torch._foreach_addcmul_(grad_shards(params), scaled, roots, value=scale)
    return value
