"""The re-ID task for the Trainer: the report's two-branch network trained with triplet + identity losses.

Loss (the report): total = lambda * (T_max + T_avg + CE_max + CE_avg), lambda = 0.5, where T is a
triplet loss on a branch's pooled feature and CE the identity cross-entropy on its classifier's
logits. ``--no-id-loss`` drops the CE terms (the report's Table 1 ablation).

Two recipes (:data:`RECIPES`; any field can still be overridden):

- ``report``: the report's ``TripletDataset`` (per anchor a random positive and a random negative),
  its triplet loss max(||a-p||^2 - ||a-n||^2 + 10, 0), Adam lr 1e-4, weight decay 5e-4, 32 anchors
  per batch (96 images), up to 25 epochs, early stopping after 5 epochs without a lower validation
  loss; flip and pad-and-crop augmentation.
- ``modern``: the "bag of tricks" baseline (Luo et al. 2019) scaled to CPU budgets: P x K batches
  (16 identities x 4 images), batch-hard triplet loss with margin 0.3 on Euclidean distances (Hermans et
  al. 2017), label smoothing 0.1, Adam lr 3.5e-4 with a 5-epoch linear warm-up from 10% and x0.1 steps
  after epochs 30 and 50 of 60, random erasing (p 0.5), best epoch and early stopping (10 epochs) on
  validation mAP. ``--last-stride 1`` is available for both, off by default (it costs ~4x in the last
  stage).

Validation, every epoch, on the split's validation identities (never trained on): one forward pass per
image gives each branch's pooled feature and the embedding. ``val_loss`` is lambda * (T_max + T_avg)
with the recipe's triplet loss on triplets (report) or P x K groups (modern) drawn with a fixed seed
from those features; the identity loss has no meaning for unseen identities and is left out. The
ranking metrics follow ``training/evaluation/reid.py`` (queries = one image per identity and camera).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.nets.reid import CLASSIFIERS, ReIDNet, ReIDNetConfig
from app.retrieval import QE_NEIGHBOURS
from training.config import MONITOR_LAST, TrainConfig
from training.data.cache import cached_images
from training.data.market import list_images
from training.data.samplers import PKSampler, TripletSampler
from training.data.transforms import BatchAugment, to_model_input
from training.engine import Batches
from training.evaluation.reid import ReIDEvaluator
from training.losses import batch_hard_triplet_loss, cosface_loss, identity_loss, triplet_loss
from training.tasks.reid_data import DISTRACTOR_PID, ReIDData

TRIPLETS = ("report", "batch_hard")

RECIPES: dict[str, dict[str, Any]] = {
    "report": {
        "triplet": "report",
        "margin": 10.0,
        "label_smoothing": 0.0,
        "batch_size": 32,
        "epochs": 25,
        "lr": 1e-4,
        "weight_decay": 5e-4,
        "warmup_epochs": 0,
        "lr_steps": (),
        "erase_p": 0.0,
        "monitor": "val_loss",
        "monitor_mode": "min",
        "patience": 5,
    },
    "modern": {
        "triplet": "batch_hard",
        "margin": 0.3,
        "label_smoothing": 0.1,
        "p": 16,
        "k": 4,
        "batch_size": 64,
        "epochs": 60,
        "lr": 3.5e-4,
        "weight_decay": 5e-4,
        "warmup_epochs": 5,
        "warmup_factor": 0.1,
        "lr_steps": (30, 50),
        "erase_p": 0.5,
        "monitor": "mAP",
        "monitor_mode": "max",
        "patience": 10,
    },
}
DEFAULT_RECIPE = "modern"


@dataclass
class ReIDTrainConfig(TrainConfig):
    """A re-ID run. Defaults are the report's recipe; :meth:`from_recipe` applies a named one."""

    TASK: ClassVar[str] = "reid"

    recipe: str = "report"
    triplet: str = "report"  # report (random triplets, squared Euclidean) | batch_hard (P x K)
    margin: float = 10.0
    loss_lambda: float = 0.5
    id_loss: bool = True
    label_smoothing: float = 0.0
    # Identity classifier: linear logits (BoT) or cosine with an additive margin (CosFace; scale s,
    # margin m); training only, so the exported network and its speed are the same either way.
    classifier: str = "linear"
    id_scale: float = 30.0
    id_margin: float = 0.35
    p: int = 16  # identities per batch (batch_hard)
    k: int = 4  # images per identity (batch_hard)
    branch_dim: int | None = None  # per-branch embedding size after a learned reduction
    last_stride: int = 2
    gem_p: float | None = None  # generalised-mean pooling in the 'avg' branch, from this exponent
    stripes: int = 0  # horizontal part features of the avg branch's map, identity loss only (PCB)
    eval_seed: int = 0  # seed of the validation query/gallery protocol
    # Train on every identity (the split's validation ones too), as shipped bundles are: validation
    # identities are then seen, so per-epoch validation is skipped and the last epoch is kept.
    train_all: bool = False
    # A folder of crops of other people added to the validation gallery (the course test/ folder):
    # the protocol that predicts a real test (docs/models.md). Costs one pass over the folder, so it
    # runs every ``distractor_every`` epochs and at the last one.
    distractors: str | None = None
    distractor_every: int = 10

    batch_size: int = 32  # anchors per batch (report); P * K for batch_hard
    epochs: int = 25
    erase_p: float = 0.0
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    patience: int = 5

    def __post_init__(self) -> None:
        if self.train_all:  # nothing unseen to choose an epoch on: keep the last one (TrainConfig's rule)
            self.monitor = MONITOR_LAST
        super().__post_init__()
        if self.triplet not in TRIPLETS:
            raise ValueError(f"triplet must be one of {', '.join(TRIPLETS)}, got {self.triplet!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; available: {', '.join(RECIPES)}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.stripes < 0:
            raise ValueError(f"stripes must be >= 0, got {self.stripes}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.id_scale <= 0 or self.id_margin < 0:
            raise ValueError(f"need id_scale > 0 and id_margin >= 0, got {self.id_scale}, {self.id_margin}")
        if self.triplet == "batch_hard":
            self.batch_size = self.p * self.k
        if self.distractor_every < 1:
            raise ValueError(f"distractor_every must be at least 1, got {self.distractor_every}")

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> ReIDTrainConfig:
        """The named recipe's settings, then ``overrides`` (None values are ignored)."""
        if recipe not in RECIPES:
            raise KeyError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
        values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(recipe=recipe, **values)


# -- the network's two outputs in one pass ------------------------------------------------------------


def branch_outputs(model: ReIDNet, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each branch's pooled feature (what the triplet loss sees) and the eval-mode embedding, in one pass.

    In eval mode the embedding equals ``model(images)``.
    """
    outputs = model.outputs(images)
    features = {name: outputs[name][0] for name in model.branches}
    necks = [neck for _, neck in outputs.values()]
    return features, F.normalize(torch.cat(necks, dim=1).float(), dim=1)


@torch.no_grad()
def embed(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    *,
    progress: bool = False,
    desc: str = "embed",
) -> torch.Tensor:
    """L2-normalised embeddings of a uint8 image tensor, in batches, on the CPU."""
    from tqdm import tqdm

    device = torch.device(device)
    model.eval().to(memory_format=torch.channels_last)
    out = []
    for start in tqdm(
        range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False
    ):
        x = to_model_input(images[start : start + batch_size], device, channels_last=True)
        out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0, getattr(model, "embedding_dim", 0))


# -- the task ---------------------------------------------------------------------------------------------


class ReIDTask:
    """Model, batches, losses and validation of a re-ID run (the Trainer's Task protocol)."""

    name = "reid"

    def __init__(
        self,
        config: ReIDTrainConfig,
        data: ReIDData,
        *,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        model: ReIDNet | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.device = torch.device(device)
        self.channels_last = channels_last
        pids = data.train_pids
        self.classes = sorted(set(pids.tolist()))
        index = {pid: i for i, pid in enumerate(self.classes)}
        self.labels = torch.as_tensor([index[p] for p in pids.tolist()], dtype=torch.long)
        self.model = model or ReIDNet(
            ReIDNetConfig(
                backbone=config.backbone,
                input_size=config.input_size,
                num_classes=len(self.classes),
                last_stride=config.last_stride,
                gem_p=config.gem_p,
                stripes=config.stripes,
                branch_dim=config.branch_dim,
                classifier=config.classifier,
            ),
            init_weights=config.init_weights,
        )
        if config.triplet == "report":
            self.sampler: TripletSampler | PKSampler = TripletSampler(
                pids, config.batch_size, seed=config.seed
            )
        else:
            self.sampler = PKSampler(pids, config.p, config.k, seed=config.seed)
        self.augment = BatchAugment(
            flip_p=0.5 if config.flip else 0.0,
            pad=config.pad,
            erase_p=config.erase_p,
            channels_last=channels_last,
        )
        self.is_query = data.query_mask(config.eval_seed)
        self.epoch = 0
        self.distractor_images: torch.Tensor | None = None
        if config.distractors and not config.train_all:
            paths = list_images(config.distractors)
            if not paths:
                raise ValueError(f"{config.distractors}: no images to use as distractors")
            self.distractor_images = cached_images(
                paths, config.input_size, config.cache_dir or None, workers=config.workers,
                progress=config.progress,
            )  # fmt: skip

    # Trainer protocol ------------------------------------------------------------------------------
    def train_batches(self, epoch: int) -> Batches:
        """The sampler's batches for ``epoch``; the order depends on (seed, epoch) only."""
        self.sampler.set_epoch(epoch)
        self.epoch = epoch

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for batch in self.sampler:
                idx = torch.as_tensor(np.concatenate(batch) if isinstance(batch, tuple) else batch)
                yield self.data.train_images[idx], self.labels[idx]

        return Batches(batches(), len(self.sampler))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        x = self.augment(images.to(self.device, non_blocking=True))
        labels = labels.to(self.device, non_blocking=True)
        out = self.model(x)
        losses = self.triplet_losses(out.features, labels)
        cfg = self.config
        if cfg.id_loss:
            for name, logits in out.logits.items():
                if cfg.classifier == "cosine":
                    losses[f"id_{name}"] = cosface_loss(
                        logits, labels, scale=cfg.id_scale, margin=cfg.id_margin,
                        label_smoothing=cfg.label_smoothing,
                    )  # fmt: skip
                else:
                    losses[f"id_{name}"] = identity_loss(logits, labels, cfg.label_smoothing)
        losses["loss"] = self.config.loss_lambda * torch.stack(list(losses.values())).sum()
        return losses

    def triplet_losses(
        self, features: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The recipe's triplet loss per branch; a report batch is anchors, positives, negatives stacked."""
        out = {}
        for name, feat in features.items():
            if self.config.triplet == "report":
                out[f"triplet_{name}"] = triplet_loss(*feat.chunk(3), margin=self.config.margin)
            else:
                out[f"triplet_{name}"] = batch_hard_triplet_loss(feat, labels, margin=self.config.margin)
        return out

    def validate(self) -> dict[str, float]:
        if self.config.train_all:
            return {"epoch": float(self.epoch)}
        features, embeddings = self.forward_validation()
        metrics = self.evaluate(embeddings)
        metrics["val_loss"] = self.validation_loss(features)
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        cfg = self.config
        if self.distractor_images is not None and (
            self.epoch % cfg.distractor_every == 0 or self.epoch == cfg.epochs
        ):
            out.update(self.evaluate_distractors(embeddings))
        return out

    def evaluate_distractors(self, embeddings: torch.Tensor) -> dict[str, float]:
        """mAP and rank-1, plain and with the service's query expansion, with the distractors added."""
        assert self.distractor_images is not None
        extra = embed(self.model, self.distractor_images, self.device, self.config.eval_batch_size)
        n = len(extra)
        metrics, _ = evaluate_embeddings(
            torch.cat([embeddings, extra]),
            np.concatenate([self.data.val_pids, np.full(n, DISTRACTOR_PID)]),
            np.concatenate([self.data.val_camids, np.full(n, -1)]),
            np.concatenate([self.is_query, np.zeros(n, dtype=bool)]),
            query_expansion=QE_NEIGHBOURS,
        )
        qe = metrics["query_expansion"]
        return {
            "distractors_mAP": metrics["mAP"],
            "distractors_rank1": metrics["rank1"],
            "distractors_qe_mAP": qe["mAP"],
            "distractors_qe_rank1": qe["rank1"],
        }

    # Validation pieces -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward_validation(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pooled features per branch and embeddings of every validation image (one pass)."""
        self.model.eval()
        feats: dict[str, list[torch.Tensor]] = {}
        embs = []
        bs = self.config.eval_batch_size
        for start in range(0, len(self.data.val_images), bs):
            x = to_model_input(self.data.val_images[start : start + bs], self.device, self.channels_last)
            f, e = branch_outputs(self.model, x)
            for name, value in f.items():
                feats.setdefault(name, []).append(value.float().cpu())
            embs.append(e.cpu())
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(embs)

    def validation_loss(self, features: dict[str, torch.Tensor]) -> float:
        """lambda * (T_avg + T_max) on fixed-seed triplets / P x K groups of the validation images."""
        pids = self.data.val_pids
        cfg = self.config
        total = 0.0
        if cfg.triplet == "report":
            sampler = TripletSampler(pids, batch_size=len(pids), seed=cfg.eval_seed, drop_last=False)
            anchors, positives, negatives = next(iter(sampler))
            for f in features.values():
                total += float(triplet_loss(f[anchors], f[positives], f[negatives], cfg.margin))
        else:
            p = min(cfg.p, len(set(pids.tolist())))
            batches = list(PKSampler(pids, p, cfg.k, seed=cfg.eval_seed))
            labels = torch.as_tensor(pids)
            for f in features.values():
                losses = [float(batch_hard_triplet_loss(f[b], labels[b], cfg.margin)) for b in batches]
                total += float(np.mean(losses)) if losses else 0.0
        return cfg.loss_lambda * total

    def evaluate(self, embeddings: torch.Tensor, *, rerank: bool = False) -> dict[str, Any]:
        """Ranking metrics and the match threshold on the validation protocol."""
        return evaluate_embeddings(
            embeddings, self.data.val_pids, self.data.val_camids, self.is_query, rerank=rerank
        )[0]

    def state_dict(self) -> dict[str, Any]:
        return {"classes": self.classes}  # samplers are deterministic per (seed, epoch): nothing else

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("classes") != self.classes:
            raise ValueError("the training identities differ from the interrupted run's")


def evaluate_embeddings(
    embeddings: torch.Tensor,
    pids: np.ndarray,
    camids: np.ndarray,
    is_query: np.ndarray,
    *,
    rerank: bool = False,
    query_expansion: int = 0,
    track_queries: bool = False,
    gallery_side: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of embeddings, and the evaluator's details (distances, indices) for plots."""
    evaluator = ReIDEvaluator(
        rerank=rerank,
        query_expansion=query_expansion,
        track_queries=track_queries,
        gallery_side=gallery_side,
    )
    evaluator.process(embeddings, pids, camids, is_query)
    metrics = evaluator.evaluate()
    return metrics, evaluator.last
