"""Loss shaping (dft, eaft, flow, asft): the task's cross-entropy with each loss token weighted, computed once.

    loss = sum_t (1 + sum_i s_i * (w_i,t - 1)) * NLL_t / n,   n: the micro-batch's loss positions

w_i,t is regularizer i's detached weight for token t (Regularizer.token_weights), s_i its strength: s_i = 0 is the
plain cross-entropy, s_i = 1 its published loss. The model then runs without labels and this replaces its own loss
(tether.step.shaped_forward): the weights cost no second pass over the logits. Positions are the model's own: the
logits at t against the label at t + 1 for a causal LM (the labels are shifted, not the logits: no copy), one class
label per row for a classifier.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tether.data import IGNORE

TokenWeights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(fp32 logits [..., vocab], each position's NLL [...], its row in the batch, broadcastable to [...]) -> the weights,
broadcastable to [...]; called without grad."""


def weighted_nll(
    logits: torch.Tensor, labels: torch.Tensor, weighers: list[tuple[TokenWeights, float]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the weighted mean NLL above, through autograd; each weigher's unweighted term mean_t (w_t - 1) * NLL_t,
    detached, for its `reg/<name>` log)."""
    if labels.ndim == 1:  # class labels: one position per row
        rows = torch.arange(len(labels), device=labels.device)
    else:  # the logits at t predict the label at t + 1, the last ones nothing
        labels = torch.cat([labels[:, 1:], labels.new_full((len(labels), 1), IGNORE)], 1)
        rows = torch.arange(len(labels), device=labels.device)[:, None]
    z = logits.float()
    nll = F.cross_entropy(z.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape)  # 0 where there is no loss
    count = (labels != IGNORE).sum().clamp(min=1)
    with torch.no_grad():
        excess = [weights(z, nll, rows) - 1 for weights, _ in weighers]
        scale = 1 + sum(s * e for e, (_, s) in zip(excess, weighers))
        terms = [(e * nll).sum() / count for e in excess]
    return (scale * nll).sum() / count, terms
