"""The multi-head attribute classifier: a backbone, global average pooling, one head per group.

``stripes`` N > 0 also pools N horizontal stripes of the final map (PCB's part pooling, Sun et al.
2018) and the heads read the global feature and the stripes side by side: upper- and lower-body
attributes (colours, sleeve and lower length) live in different rows of a pedestrian crop, and a
global average mixes them. ``max_pool`` also adds the global max of the map: small items (a hat, a
handbag) fill a few positions, which an average dilutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from app.attribute_schema import ATTRIBUTE_GROUPS
from app.nets.backbones import build_backbone
from app.nets.common import IMAGENET_MEAN, IMAGENET_STD, Normalize, stripe_bins


def _default_heads() -> dict[str, int]:
    return {g.name: g.num_classes for g in ATTRIBUTE_GROUPS}


@dataclass
class AttributeNetConfig:
    """Everything needed to rebuild the network; stored in the bundle manifest."""

    backbone: str = "mobilenet_v2"
    input_size: tuple[int, int] = (256, 128)  # (height, width)
    heads: dict[str, int] = field(default_factory=_default_heads)
    dropout: float = 0.2
    last_stride: int = 2  # 1: the last stage at half the usual stride (``build_backbone``)
    stripes: int = 0  # horizontal stripes pooled beside the global average (0: global only)
    max_pool: bool = False  # the global max of the final map beside the average
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> AttributeNetConfig:
        """Rebuild from a manifest (JSON turns tuples into lists)."""
        d = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


class AttributeNet(nn.Module):
    """Backbone + GAP (+ max, + stripes) + {group: Dropout + Linear}; ``forward`` gives logits per group."""

    def __init__(self, config: AttributeNetConfig, init_weights: str | None = None) -> None:
        super().__init__()
        if config.stripes < 0:
            raise ValueError(f"stripes must be >= 0, got {config.stripes}")
        self.config = config
        parts = build_backbone(config.backbone, init_weights=init_weights, last_stride=config.last_stride)
        self.normalize = Normalize(config.mean, config.std)
        self.trunk = parts.trunk
        self.last_stage = parts.last_stage
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Dropout(config.dropout),
                    nn.Linear(parts.channels * (1 + int(config.max_pool) + config.stripes), n),
                )
                for name, n in config.heads.items()
            }
        )

    @property
    def feature_dim(self) -> int:
        """Size of the pooled features the heads read."""
        first = next(iter(self.heads.values()))
        return first[1].in_features

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, feature_dim): the global average, the global max (with
        ``max_pool``), then each stripe's average."""
        fmap = self.last_stage(self.trunk(self.normalize(images)))
        pooled = [self.pool(fmap).flatten(1)]
        if self.config.max_pool:
            pooled.append(fmap.amax((2, 3)))
        if self.config.stripes:
            # The map's height is fixed by the input size, so the ONNX trace records constant slices.
            rows = stripe_bins(int(fmap.shape[2]), self.config.stripes)
            pooled += [fmap[:, :, a:b].mean((2, 3)) for a, b in rows]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, 1)

    def classify(self, feat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per group of pooled features."""
        return {name: head(feat) for name, head in self.heads.items()}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.features(images))
