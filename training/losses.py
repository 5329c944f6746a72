"""Training losses for both models: class-weighted multi-head CE, identity CE, triplet variants."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadCrossEntropy(nn.Module):
    """Sum over attribute groups of class-weighted cross-entropy (the report's attribute loss),
    optionally label-smoothed."""

    def __init__(self, class_weights: Mapping[str, torch.Tensor], label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.names = list(class_weights)
        self.label_smoothing = label_smoothing
        for name, weights in class_weights.items():
            self.register_buffer(f"w_{name}", torch.as_tensor(weights, dtype=torch.float32))

    def forward(
        self, logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-group losses plus their sum under the key ``loss``."""
        losses = {
            name: F.cross_entropy(
                logits[name].float(),
                targets[name],
                weight=getattr(self, f"w_{name}"),
                label_smoothing=self.label_smoothing,
            )
            for name in self.names
        }
        losses["loss"] = torch.stack(list(losses.values())).sum()
        return losses


def identity_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Identity cross-entropy, optionally with label smoothing (Szegedy et al.)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def cosface_loss(
    cosines: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float = 30.0,
    margin: float = 0.35,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Large-margin cosine loss (CosFace, Wang et al. 2018): cross-entropy of s (cos - m [true class])."""
    target = F.one_hot(labels, cosines.shape[1]).to(cosines.dtype)
    logits = scale * (cosines.float() - margin * target)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def pairwise_distances(x: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """Euclidean (or squared Euclidean) distance matrix of the rows of ``x``."""
    x = x.float()
    sq = x.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(0.0)
    if squared:
        return d
    # The epsilon keeps sqrt's gradient finite on the zero diagonal.
    return (d + 1e-12).sqrt()


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 10.0
) -> torch.Tensor:
    """The report's triplet loss: max(||a-p||^2 - ||a-n||^2 + margin, 0), averaged over triplets."""
    d_ap = (anchor.float() - positive.float()).pow(2).sum(1)
    d_an = (anchor.float() - negative.float()).pow(2).sum(1)
    return F.relu(d_ap - d_an + margin).mean()


def batch_hard_triplet_loss(
    features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances.

    For each anchor: its farthest positive and nearest negative within the batch. Anchors without a
    positive or a negative in the batch are left out.
    """
    dist = pairwise_distances(features)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask = same & ~eye
    neg_mask = ~same
    valid = pos_mask.any(1) & neg_mask.any(1)
    if not valid.any():
        return features.sum() * 0.0
    hardest_pos = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(~neg_mask, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin)[valid].mean()
