"""One regularized optimizer step, defined once, in the order it runs.

    1. prefetch    the frozen reference's outputs for the batch (before the model's forward: lower peak memory)
    2. forward     the model's task loss on the micro-batch (the Trainer's own compute_loss, or model(**batch));
                   when regularizers shape the loss (dft, eaft, flow, asft), the model runs without labels and the
                   stack computes the cross-entropy once, each token weighted (shaped_forward)
    3. loss        task loss + share * sum of strength * autograd penalty (kl, distill, label_smoothing), where
                   share weighs the micro-batch's penalties as its task loss is weighed (RegularizedMixin); a
                   non-finite loss is flagged here and acted on in step 6
    4. backward    (repeated for each micro-batch of an accumulated batch)
    5. clipping    of the task and autograd gradients, by the Trainer (max_grad_norm)
    6. optimizer.step(), whose hooks (RegularizerStack.attach) run, in this order:
         pre   closed-form gradients added (l1, l2, l2_sp penalty form, ewc, si: RegularizerStack.before_step),
               so they are not clipped; then the skip-or-stop decision for a flagged step; then the decoupled
               updates from theta_t (l2_sp decoupled: RegularizerStack.step_begin)
         the optimizer's own update (AdamW's decay from the weight_decay groups, llrd's lr per group)
         post  step_end (ema's average)
    7. step end    flags the optimizer did not read are dropped (fp16's scaler skipped the step)
At logging steps RegularizerStack.pop_logs gives each `reg/<name>` and checks the closed-form values for NaN/inf;
the same check runs before each checkpoint save.

The order rules are code: the optimizer's groups come from the model's structure alone (so building them before
setup, as transformers does under FSDP2, is correct), and a stack that was never set up stops at step 6.
RegularizedTrainer runs steps 1-3 in compute_loss and 7 in a callback; `train_step` below runs all of them for
one micro-batch outside a Trainer (tests, benchmarks) through the same functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tether.regularizers import RegularizerStack


def shaped_forward(stack: RegularizerStack, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """Step 2 when regularizers shape the loss: (the stack's token-weighted cross-entropy, a mean over the
    micro-batch's loss positions; the outputs). Without labels the model computes no loss of its own, so the logits
    are read once."""
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return stack.token_loss(inputs, outputs.logits), outputs


def regularized_loss(
    stack: RegularizerStack,
    model: nn.Module,
    inputs: dict[str, Any],
    outputs: Any,
    task_loss: torch.Tensor,
    share: Callable[[], float | torch.Tensor] | None = None,
) -> torch.Tensor:
    """Step 3: the task loss plus this micro-batch's weighted autograd penalties times share() (1 without it; asked
    only when there is a penalty, so steps without one pay nothing); a NaN/inf result is flagged on the stack (one
    device sync per micro-batch), which skips or stops the coming optimizer step."""
    penalty = stack.penalty(model, inputs, outputs)
    loss = task_loss
    if penalty is not None:
        loss = task_loss + (penalty if share is None else penalty * share())
    if not torch.isfinite(loss.detach()):
        stack.flag_non_finite(non_finite_term(stack, task_loss))
    return loss


def non_finite_term(stack: RegularizerStack, task_loss: torch.Tensor) -> str:
    """What went NaN/inf, said so that the user can act."""
    if not torch.isfinite(task_loss.detach()):
        return f"the task loss became {task_loss.item()}: lower the learning rate or check the data"
    return stack.non_finite_term()


def train_step(
    model: nn.Module,
    inputs: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    stack: RegularizerStack,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """Steps 1-7 for one micro-batch per optimizer step, outside a Trainer. The optimizer must hold the stack's
    groups with its hooks attached (RegularizerStack.optimizer_groups, attach). Returns the loss, detached."""
    stack.prefetch(inputs)
    if stack.shaping_names:
        task_loss, outputs = shaped_forward(stack, model, inputs)
    else:
        outputs = model(**inputs)
        task_loss = outputs.loss
    loss = regularized_loss(stack, model, inputs, outputs, task_loss)
    loss.backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    stack.discard_flags()
    return loss.detach()
