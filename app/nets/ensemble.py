"""Several re-ID networks as one bundle: each embeds the crop at its own input size, and their
embeddings, each scaled by the square root of its weight, are concatenated.

The crop is resized once, to the first member's input size (the bundle's); a member with a smaller
input takes that tensor resized bilinearly (at exactly half the size in each direction this is the
mean of each 2x2 block). With unit-length member embeddings and weights summing to 1, the cosine
similarity of two ensemble embeddings is the weighted mean of the members' similarities, which is what
``benchmarks/query_side.py score --ensemble`` measured before this module existed.

The concatenation is then projected, without loss, onto the subspace it lies in. A branch's embedding
is an affine image of its pooled feature (linear reduction, then BatchNorm: ``A x + c``), so it spans at
most ``channels + 1`` dimensions whatever its width: OSNet x0.25's 256-wide branches span 129 of 256. An
orthonormal basis of each branch's span, from its weights alone (no data), keeps every inner product and
so every ranking, at half the width for the shipped pair (516 values instead of 1,024: the gallery's
memory of one network). The basis is stored with the weights, so every runtime uses the same one.

The manifest's architecture holds ``ensemble``: one entry per member, its own architecture, its weight
and the bundle it came from, and ``dim``, the projected width; the weights file holds each member's
tensors under ``members.<i>.`` and the projection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from app.nets.reid import ReIDNet, ReIDNetConfig

ENSEMBLE = "ensemble"


def is_ensemble(architecture: dict[str, Any]) -> bool:
    """Whether a manifest's architecture describes an ensemble of re-ID networks."""
    return bool(architecture.get(ENSEMBLE))


def member_weights(architecture: dict[str, Any]) -> list[float]:
    """The members' weights as the manifest records them."""
    return [float(m["weight"]) for m in architecture[ENSEMBLE]]


def _part_span(reduce: nn.Module, neck: nn.BatchNorm1d) -> torch.Tensor:
    """Orthonormal columns spanning every output of ``neck(reduce(x))`` (eval mode), whatever x."""
    scale = neck.weight.double() / torch.sqrt(neck.running_var.double() + neck.eps)
    shift = neck.bias.double() - scale * neck.running_mean.double()
    linear = reduce.weight.double() if isinstance(reduce, nn.Linear) else torch.eye(len(scale)).double()
    affine = torch.cat([scale[:, None] * linear, shift[:, None]], dim=1)  # (out, in + 1)
    basis, _, _ = torch.linalg.svd(affine, full_matrices=False)
    return basis[:, : min(affine.shape)]


def embedding_span(member: ReIDNet) -> torch.Tensor:
    """(embedding_dim, r) orthonormal basis of the subspace all of ``member``'s embeddings lie in: one
    block per branch and stripe, in embedding order (normalising and flip averaging stay inside it)."""
    parts = [*member.branches.values(), *member.stripes.values()]
    return torch.block_diag(*[_part_span(p.reduce, p.neck) for p in parts]).float()


class ReIDEnsemble(nn.Module):
    """Re-ID networks run side by side on one crop; the embedding is their weighted concatenation,
    projected onto the subspace it spans."""

    def __init__(
        self, members: Sequence[ReIDNet], weights: Sequence[float], projection: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if len(members) < 2 or len(members) != len(weights):
            raise ValueError(f"an ensemble needs two or more members, each with a weight; got {len(members)} "
                             f"members and {len(weights)} weights")  # fmt: skip
        if any(not w > 0 for w in weights):
            raise ValueError(f"member weights must be positive, got {list(weights)}")
        first = members[0].config.input_size
        for member in members[1:]:
            height, width = member.config.input_size
            if height > first[0] or width > first[1]:
                raise ValueError(
                    f"the first member's input ({first[0]}x{first[1]}) is the bundle's: a member with a "
                    f"larger input ({height}x{width}) would see an upsampled crop; put the largest first"
                )
        self.members = nn.ModuleList(members)
        total = sum(weights)
        self.scales = [math.sqrt(w / total) for w in weights]
        if projection is None:  # from the members' weights: they must be loaded already
            projection = torch.block_diag(*[embedding_span(m.eval()) for m in members])
        self.register_buffer("projection", projection)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> ReIDEnsemble:
        """Rebuild (untrained, the projection a placeholder until the weights load) from a manifest."""
        members = [ReIDNet(ReIDNetConfig.from_dict(m["architecture"])) for m in architecture[ENSEMBLE]]
        width = sum(m.embedding_dim for m in members)
        return cls(members, member_weights(architecture), torch.zeros(width, int(architecture["dim"])))

    @property
    def embedding_dim(self) -> int:
        return self.projection.shape[1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("an ensemble bundle is for inference only; train its members")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images
        parts = []
        for member, scale in zip(self.members, self.scales, strict=True):
            size = tuple(member.config.input_size)
            inputs = x if tuple(x.shape[-2:]) == size else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False
            )  # fmt: skip
            parts.append(member(inputs) * scale)
        return F.normalize(torch.cat(parts, dim=1) @ self.projection, dim=1)
