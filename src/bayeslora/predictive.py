"""The predictive distribution over choices, with its uncertainty decomposition.

For per-sample probabilities ``p_s`` (S posterior samples), the mean ``p = mean_s p_s`` and

* total uncertainty: ``H[p]`` (entropy of the mean predictive),
* aleatoric: ``mean_s H[p_s]`` (expected entropy: the noise the model believes is in the data),
* epistemic: ``H[p] - mean_s H[p_s]`` (mutual information between the label and the weights).

All in nats. With no samples (a deterministic method) aleatoric = total and epistemic = 0.

Some predictives report probabilities that are not the samples' mean: Laplace's and TFB's linearized predictive
give the mean-field closed form and draw logit samples only for the split. There total is ``H[probs]`` (the
entropy of the probabilities reported), epistemic the samples' mutual information ``H[mean_s p_s] - mean_s H[p_s]``
capped at total, and aleatoric the rest, so total = aleatoric + epistemic with both parts >= 0 for any number of
samples. Where ``probs`` is the samples' mean this is the decomposition above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dim; ``0 log 0 = 0`` so absent choices are harmless."""
    return -torch.special.xlogy(probs, probs).sum(-1)


@dataclass
class Predictive:
    """probs ``(B, C)``; sample_probs ``(S, B, C)`` or None."""

    probs: torch.Tensor
    sample_probs: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> Predictive:
        """From deterministic choice logits ``(B, C)`` (``-inf`` at absent choices)."""
        return cls(probs=torch.softmax(logits.float(), dim=-1))

    @classmethod
    def from_sample_logits(cls, logits: torch.Tensor) -> Predictive:
        """From per-sample choice logits ``(S, B, C)``: the mean of the per-sample softmaxes."""
        sample_probs = torch.softmax(logits.float(), dim=-1)
        return cls(probs=sample_probs.mean(0), sample_probs=sample_probs)

    @property
    def n_samples(self) -> int:
        return 0 if self.sample_probs is None else self.sample_probs.shape[0]

    @property
    def confidence(self) -> torch.Tensor:
        return self.probs.max(-1).values

    @property
    def prediction(self) -> torch.Tensor:
        return self.probs.argmax(-1)

    @property
    def total(self) -> torch.Tensor:
        return entropy(self.probs)

    @property
    def aleatoric(self) -> torch.Tensor:
        return self.total - self.epistemic

    @property
    def epistemic(self) -> torch.Tensor:
        """The samples' mutual information, at most :attr:`total` (see the module docstring)."""
        if self.sample_probs is None:
            return torch.zeros_like(self.total)
        mutual = entropy(self.sample_probs.mean(0)) - entropy(self.sample_probs).mean(0)
        return torch.minimum(mutual.clamp_min(0.0), self.total)

    def detach(self) -> Predictive:
        sp = None if self.sample_probs is None else self.sample_probs.detach().cpu()
        return Predictive(self.probs.detach().cpu(), sp)

    @staticmethod
    def cat(parts: list[Predictive]) -> Predictive:
        """Concatenate along the batch dim (sample counts must agree; choice counts are padded with zeros)."""
        C = max(p.probs.shape[-1] for p in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, C - t.shape[-1]))  # noqa: E731
        probs = torch.cat([pad(p.probs) for p in parts])
        if any(p.sample_probs is None for p in parts):
            return Predictive(probs)
        return Predictive(probs, torch.cat([pad(p.sample_probs) for p in parts], dim=1))
