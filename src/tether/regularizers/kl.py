"""KL penalty to the original model, as in RL fine-tuning: strength * KL(student || reference) per loss position.

The same computation as distill (see tether.regularizers.distill for the masking, the chunking and the other
divergences), with the defaults of a constraint rather than of a teacher signal:
  distill  forward KL(teacher || student) at T = 2, strength ~1: learn the original model's whole distribution
           (soft targets), mean-seeking, the student spreads over what the teacher finds likely;
  kl       reverse KL(student || reference) at T = 1, strength ~0.1: a leash, mode-seeking, it charges the student
           for putting probability where the original model puts little (the KL term of RLHF/PPO, DPO's beta).
At T = 1 the constrained distribution is the model's own: a temperature would change what is being held.
Both share one reference forward per batch when used together.
"""

from __future__ import annotations

from pydantic import Field

from tether.reference import ReferenceOptions
from tether.regularizers.base import register
from tether.regularizers.distill import Distill, DistillConfig, Divergence


class KLConfig(DistillConfig):
    strength: float = Field(0.1, ge=0)
    """beta of RL fine-tuning: loss = CE + strength * KL; 0.01-0.5 (higher holds the model closer)."""
    divergence: Divergence = "reverse"
    """reverse KL(student || reference), as RL fine-tuning; forward KL(reference || student); jsd (see beta)."""
    temperature: float = Field(1.0, gt=0)
    """T: both distributions are softmax(logits / T) and the term is scaled by T^2; keep 1 to hold the model's own
    distribution."""
    beta: float = Field(0.5, gt=0, lt=1)
    """jsd only: weight of the reference in the mixture m = beta * reference + (1 - beta) * student."""
    chunk_size: int = Field(128, ge=1)
    """Loss positions per chunk: fp32 work memory is about 5 x chunk_size x vocab x 4 bytes (128 x 32k: 80 MB)."""
    reference: ReferenceOptions = Field(default_factory=ReferenceOptions)
    """How the original model is kept (see tether.reference); shared with distill: give the same options or one."""


@register("kl", KLConfig)
class KL(Distill):
    """distill's computation under kl's defaults (module docstring)."""
