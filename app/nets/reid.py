"""The report's two-branch re-ID network: a shared trunk, the last stage duplicated, avg and max pooling.

Each branch: last stage -> global pooling -> (optional linear reduction) -> feature f used by the
triplet loss -> BatchNorm neck -> identity classifier (training only). In eval mode the network returns
only the embedding: both branches' neck features concatenated and L2-normalised.

``stripes`` N > 0 adds PCB's part features (Sun et al. 2018): N horizontal stripes of the avg branch's
final map, each average-pooled into its own BN neck and identity classifier (no triplet loss, as in
PCB), their necks appended to the embedding. The last stage is not copied, so they cost a pooling.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.nets.backbones import build_backbone
from app.nets.common import IMAGENET_MEAN, IMAGENET_STD, Normalize, stripe_bins


@dataclass
class ReIDNetConfig:
    """Everything needed to rebuild the network; stored in the bundle manifest."""

    backbone: str = "mobilenet_v2"
    input_size: tuple[int, int] = (256, 128)  # (height, width)
    num_classes: int = 0  # identities seen in training; 0 builds no classifier (inference only)
    last_stride: int = 2
    # Per-branch feature size after a learned linear reduction; None keeps the backbone's channels.
    branch_dim: int | None = None
    # Identity classifier (training only): "linear" logits, or "cosine" similarities to normalised
    # class weights for a margin loss (CosFace, Wang et al. 2018).
    classifier: str = "linear"
    # Test-time flip: the embedding is the normalised mean of the crop's and its mirror image's (twice
    # the inference cost; a bundle option, ``reid-train flip-bundle``).
    flip_average: bool = False
    # Generalised-mean pooling (Radenovic et al. 2018) in the 'avg' branch, its exponent learned from
    # this start; None keeps average pooling (p = 1). The 'max' branch is the p -> infinity end.
    gem_p: float | None = None
    # Horizontal stripes of the avg branch's map pooled as extra identity-trained parts (0: none).
    stripes: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ReIDNetConfig:
        """Rebuild from a manifest (JSON turns tuples into lists)."""
        d = dict(data)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])  # type: ignore[arg-type]
        return cls(**d)  # type: ignore[arg-type]


@dataclass
class ReIDTrainOutput:
    """What a training step needs: pooled features for the triplet loss, logits for the ID loss."""

    features: dict[str, torch.Tensor]  # branch name ('avg' / 'max') -> (B, D)
    logits: dict[str, torch.Tensor]  # branch name -> (B, num_classes); empty without classifier


class CosineClassifier(nn.Module):
    """Cosine similarity of the normalised features to each class's normalised weight vector."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, features))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast: a margin of 0.35 on bf16 cosines (8-bit mantissa) is coarse.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))


CLASSIFIERS = ("linear", "cosine")


class GeneralizedMeanPool(nn.Module):
    """(mean of x^p over the map)^(1/p) per channel, p learned; x >= 0 after the stage's ReLU."""

    def __init__(self, p: float, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast: x^3 of bf16 activations loses the small ones.
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = self.p.float()
            return F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p)


class StripePool(nn.Module):
    """Average of rows ``bins[index]`` of the map: one of ``stripes`` horizontal parts."""

    def __init__(self, index: int, stripes: int) -> None:
        super().__init__()
        self.index, self.stripes = index, stripes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The map's height is fixed by the input size, so the ONNX trace records constant slices.
        a, b = stripe_bins(int(x.shape[2]), self.stripes)[self.index]
        return x[:, :, a:b].mean((2, 3), keepdim=True)


class Branch(nn.Module):
    """One branch: its own copy of the last stage, pooling, reduction, BN neck, classifier."""

    def __init__(
        self,
        stage: nn.Module,
        pool: nn.Module,
        channels: int,
        dim: int | None,
        classes: int,
        classifier: str = "linear",
    ) -> None:
        super().__init__()
        self.stage = stage
        self.pool = pool
        self.reduce = nn.Linear(channels, dim, bias=False) if dim else nn.Identity()
        out = dim or channels
        self.neck = nn.BatchNorm1d(out)
        self.neck.bias.requires_grad_(False)  # BNNeck (Luo et al.): no shift before the classifier
        self.classifier: nn.Module | None = None
        if classes and classifier == "cosine":
            self.classifier = CosineClassifier(out, classes)
        elif classes:
            self.classifier = nn.Linear(out, classes, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.stage(x))

    def head(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled (and reduced) feature and its BN-neck output of a final map."""
        feat = self.reduce(self.pool(fmap).flatten(1))
        return feat, self.neck(feat)


class ReIDNet(nn.Module):
    """Shared trunk + avg-pool branch + max-pool branch (+ stripe parts of the avg branch's map)."""

    def __init__(self, config: ReIDNetConfig, init_weights: str | None = None) -> None:
        super().__init__()
        if config.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {config.classifier!r}")
        self.config = config
        parts = build_backbone(config.backbone, init_weights=init_weights, last_stride=config.last_stride)
        self.normalize = Normalize(config.mean, config.std)
        self.trunk = parts.trunk
        if config.gem_p is not None and config.gem_p <= 0:
            raise ValueError(f"gem_p must be positive, got {config.gem_p}")
        head = (parts.channels, config.branch_dim, config.num_classes, config.classifier)
        mean_pool = nn.AdaptiveAvgPool2d(1) if config.gem_p is None else GeneralizedMeanPool(config.gem_p)
        self.branches = nn.ModuleDict(
            {
                "avg": Branch(parts.last_stage, mean_pool, *head),
                "max": Branch(copy.deepcopy(parts.last_stage), nn.AdaptiveMaxPool2d(1), *head),
            }
        )
        if config.stripes < 0:
            raise ValueError(f"stripes must be >= 0, got {config.stripes}")
        # Parts keep the backbone's channels: no reduction, so each adds channels to the embedding.
        # A ModuleDict of their own keeps the branches' state-dict keys of earlier bundles.
        part = (parts.channels, None, config.num_classes, config.classifier)
        self.stripes = nn.ModuleDict(
            {
                f"stripe{i}": Branch(nn.Identity(), StripePool(i, config.stripes), *part)
                for i in range(config.stripes)
            }
        )

    @property
    def embedding_dim(self) -> int:
        return sum(b.neck.num_features for b in (*self.branches.values(), *self.stripes.values()))

    def outputs(self, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(pooled feature, BN-neck output) per branch and stripe, in embedding order."""
        shared = self.trunk(self.normalize(images))
        maps = {name: branch.stage(shared) for name, branch in self.branches.items()}
        out = {name: branch.head(maps[name]) for name, branch in self.branches.items()}
        out.update({part: stripe.head(maps["avg"]) for part, stripe in self.stripes.items()})
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor | ReIDTrainOutput:
        flip = self.config.flip_average and not self.training
        if flip:  # crops and their mirror images in one pass
            images = torch.cat([images, images.flip(-1)])
        outputs = self.outputs(images)
        if not self.training:
            embedding = F.normalize(torch.cat([neck for _, neck in outputs.values()], dim=1), dim=1)
            if flip:
                plain, mirrored = embedding.chunk(2)
                embedding = F.normalize(plain + mirrored, dim=1)
            return embedding
        # The triplet loss sees the two global branches only; stripes learn from identities (PCB).
        features = {name: outputs[name][0] for name in self.branches}
        logits = {
            name: branch.classifier(outputs[name][1])
            for name, branch in (*self.branches.items(), *self.stripes.items())
            if branch.classifier is not None
        }
        return ReIDTrainOutput(features=features, logits=logits)
