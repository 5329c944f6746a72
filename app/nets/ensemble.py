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
tensors under ``members.<i>.`` and one projection block per branch (``projection<k>``).
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


def _parts(member: ReIDNet) -> list[nn.Module]:
    """The member's branches and stripes, in embedding order."""
    return [*member.branches.values(), *member.stripes.values()]


def _span_width(part: nn.Module) -> int:
    """Dimensions a part's embedding spans at most: its width, or its input's plus the shift."""
    width = part.neck.num_features
    return min(width, part.reduce.in_features + 1) if isinstance(part.reduce, nn.Linear) else width


def part_span(part: nn.Module) -> torch.Tensor:
    """(width, r) orthonormal columns spanning every output of ``neck(reduce(x))`` (eval mode),
    whatever x: the reduction and BatchNorm are one affine map ``A x + c``, spanned by [A | c]."""
    neck = part.neck
    scale = neck.weight.double() / torch.sqrt(neck.running_var.double() + neck.eps)
    shift = neck.bias.double() - scale * neck.running_mean.double()
    reduce = part.reduce
    linear = reduce.weight.double() if isinstance(reduce, nn.Linear) else torch.eye(len(scale)).double()
    affine = torch.cat([scale[:, None] * linear, shift[:, None]], dim=1)  # (width, in + 1)
    basis, _, _ = torch.linalg.svd(affine, full_matrices=False)
    return basis[:, : _span_width(part)].float()


class ReIDEnsemble(nn.Module):
    """Re-ID networks run side by side on one crop; the embedding is their weighted concatenation,
    each branch's part projected onto the subspace it spans."""

    def __init__(
        self,
        members: Sequence[ReIDNet],
        weights: Sequence[float],
        projections: Sequence[torch.Tensor] | None = None,
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
        self.part_widths = [[p.neck.num_features for p in _parts(m)] for m in members]
        if projections is None:  # from the members' weights: they must be loaded already
            projections = [part_span(p) for m in members for p in _parts(m.eval())]
        # One block per part (not one block-diagonal matrix): a quarter of the bytes for two members.
        for i, block in enumerate(projections):
            self.register_buffer(f"projection{i}", block)
        self.blocks = len(projections)

    @classmethod
    def from_architecture(cls, architecture: dict[str, Any]) -> ReIDEnsemble:
        """Rebuild (untrained, the projections placeholders until the weights load) from a manifest."""
        members = [ReIDNet(ReIDNetConfig.from_dict(m["architecture"])) for m in architecture[ENSEMBLE]]
        shapes = [(p.neck.num_features, _span_width(p)) for m in members for p in _parts(m)]
        return cls(members, member_weights(architecture), [torch.zeros(shape) for shape in shapes])

    def projection_blocks(self) -> list[torch.Tensor]:
        """The parts' projections, in embedding order."""
        return [getattr(self, f"projection{i}") for i in range(self.blocks)]

    @property
    def embedding_dim(self) -> int:
        return sum(block.shape[1] for block in self.projection_blocks())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("an ensemble bundle is for inference only; train its members")
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images
        parts = []
        for member, scale, widths in zip(self.members, self.scales, self.part_widths, strict=True):
            size = tuple(member.config.input_size)
            inputs = x if tuple(x.shape[-2:]) == size else F.interpolate(
                x, size=size, mode="bilinear", align_corners=False
            )  # fmt: skip
            parts.extend((member(inputs) * scale).split(widths, dim=1))
        projected = [part @ block for part, block in zip(parts, self.projection_blocks(), strict=True)]
        return F.normalize(torch.cat(projected, dim=1), dim=1)
