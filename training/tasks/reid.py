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

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.nets.reid import ReIDNet, ReIDNetConfig
from app.retrieval import QE_NEIGHBOURS
from training.config import TrainConfig
from training.data.cache import cached_images
from training.data.market import MarketData, Sample, list_images, load_market
from training.data.samplers import PKSampler, TripletSampler
from training.data.split import Split, resolve_split
from training.data.transforms import BatchAugment, to_model_input
from training.engine import Batches
from training.evaluation.reid import ReIDEvaluator, split_query_gallery, unlabelled_threshold
from training.losses import batch_hard_triplet_loss, identity_loss, triplet_loss

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
    p: int = 16  # identities per batch (batch_hard)
    k: int = 4  # images per identity (batch_hard)
    branch_dim: int | None = None  # per-branch embedding size after a learned reduction
    last_stride: int = 2
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
        super().__post_init__()
        if self.triplet not in TRIPLETS:
            raise ValueError(f"triplet must be one of {', '.join(TRIPLETS)}, got {self.triplet!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; available: {', '.join(RECIPES)}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.triplet == "batch_hard":
            self.batch_size = self.p * self.k
        if self.distractor_every < 1:
            raise ValueError(f"distractor_every must be at least 1, got {self.distractor_every}")
        if self.train_all:  # nothing unseen to choose an epoch on: keep the last one
            self.monitor, self.monitor_mode, self.patience = "epoch", "max", 0

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **overrides: Any) -> ReIDTrainConfig:
        """The named recipe's settings, then ``overrides`` (None values are ignored)."""
        if recipe not in RECIPES:
            raise KeyError(f"unknown recipe {recipe!r}; available: {', '.join(RECIPES)}")
        values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(recipe=recipe, **values)


# -- data -------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Images to rank among themselves: queries and gallery, with identity and camera per image."""

    name: str  # 'validation' | 'market_test'
    images: torch.Tensor  # uint8 (N, 3, H, W)
    pids: np.ndarray
    camids: np.ndarray
    is_query: np.ndarray
    note: str = ""


@dataclass
class ReIDData:
    """Training and validation images (uint8 caches) with identity and camera per image."""

    train: list[Sample]
    val: list[Sample]
    train_images: torch.Tensor
    val_images: torch.Tensor
    split: Split
    data: MarketData

    @property
    def train_pids(self) -> np.ndarray:
        return np.asarray([s.pid for s in self.train])

    @property
    def val_pids(self) -> np.ndarray:
        return np.asarray([s.pid for s in self.val])

    @property
    def val_camids(self) -> np.ndarray:
        return np.asarray([s.camid for s in self.val])

    def query_mask(self, seed: int = 0) -> np.ndarray:
        """Which validation images are queries (one per identity and camera, seeded)."""
        q, _ = split_query_gallery(self.val_pids, self.val_camids, seed=seed)
        return np.isin(np.arange(len(self.val)), q)

    def validation_set(self, seed: int = 0) -> EvalSet:
        note = f"validation identities of the split; one query per identity and camera (seed {seed})"
        return EvalSet(
            "validation", self.val_images, self.val_pids, self.val_camids, self.query_mask(seed), note
        )


def market_test_set(
    data: MarketData, size: tuple[int, int], cache_dir: str | None, *, workers: int = 2, progress: bool = True
) -> EvalSet:
    """The official Market-1501 test protocol: ``query/`` against ``bounding_box_test/`` (original layout;
    junk images, pid -1, are ignored by the metrics, distractors, pid 0, count as wrong matches)."""
    if not data.query or not data.gallery:
        raise ValueError(
            f"{data.root}: the {data.layout} layout has no labelled query/gallery; "
            "use the validation protocol (or the original Market-1501 layout)"
        )
    samples = data.query + data.gallery
    images = cached_images([s.path for s in samples], size, cache_dir, workers=workers, progress=progress)
    is_query = np.arange(len(samples)) < len(data.query)
    return EvalSet(
        "market_test",
        images,
        np.asarray([s.pid for s in samples]),
        np.asarray([s.camid for s in samples]),
        is_query,
        "Market-1501 test protocol: query/ against bounding_box_test/",
    )


DISTRACTOR_PID = 0  # Market-1501's code for "another person": a wrong match, unlike junk (-1)


def with_distractors(
    eval_set: EvalSet,
    folder: str | Path,
    size: tuple[int, int],
    cache_dir: str | None,
    *,
    workers: int = 2,
    progress: bool = True,
) -> EvalSet:
    """``eval_set`` with every image of ``folder`` added to its gallery as a distractor (pid 0, camera
    unknown): crops of people who are not among its identities, e.g. the course ``test/`` folder for the
    validation identities. A small gallery without distractors flatters: on the shipped re-ID bundle,
    mAP 0.916 on validation alone against 0.70 on a labelled test over the 19,679 course test crops."""
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"{folder}: no images to use as distractors")
    images = cached_images(paths, size, cache_dir, workers=workers, progress=progress)
    n = len(paths)
    return EvalSet(
        f"{eval_set.name}_distractors",
        torch.cat([eval_set.images, images]),
        np.concatenate([eval_set.pids, np.full(n, DISTRACTOR_PID)]),
        np.concatenate([eval_set.camids, np.full(n, -1)]),
        np.concatenate([eval_set.is_query, np.zeros(n, dtype=bool)]),
        f"{eval_set.note}; gallery plus {n} distractors from {folder}",
    )


def load_reid_data(config: ReIDTrainConfig, run_dir: str | Path) -> ReIDData:
    """Read the dataset, apply ``limit_ids``, reuse or make the shared split, decode into the cache.

    ``config.layout`` and ``config.data_fingerprint`` are filled in (the saved config records them).
    """
    data = load_market(config.data_root, config.layout)
    if config.data_fingerprint and config.data_fingerprint != data.fingerprint:
        raise ValueError(
            f"{config.data_root}: the data changed since this run started "
            f"(fingerprint {data.fingerprint[:12]} != {config.data_fingerprint[:12]})"
        )
    config.layout, config.data_fingerprint = data.layout, data.fingerprint
    data = data.limit_train_ids(config.limit_ids, config.seed)
    labels = {pid: data.attributes.get(pid, {}) for pid in data.train_ids}
    split = resolve_split(
        labels,
        split_file=config.split_file,
        run_dir=run_dir,
        val_fraction=config.val_fraction,
        seed=config.seed,
        data_fingerprint=data.fingerprint,
    )
    train, val = split.partition(data.train)
    if config.train_all:
        train = train + val
    # One cache of all training-layout images, shared with the attribute task (same file).
    images = cached_images(
        [s.path for s in data.train],
        config.input_size,
        config.cache_dir or None,
        workers=config.workers,
        progress=config.progress,
    )
    row = {s.path: i for i, s in enumerate(data.train)}
    return ReIDData(
        train,
        val,
        images[[row[s.path] for s in train]],
        images[[row[s.path] for s in val]],
        split,
        data,
    )


# -- the network's two outputs in one pass ------------------------------------------------------------


def branch_outputs(model: ReIDNet, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each branch's pooled feature (what the triplet loss sees) and the eval-mode embedding, in one pass.

    In eval mode the embedding equals ``model(images)``.
    """
    shared = model.trunk(model.normalize(images))
    features, necks = {}, []
    for name, branch in model.branches.items():
        feat, neck = branch(shared)
        features[name] = feat
        necks.append(neck)
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
                branch_dim=config.branch_dim,
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
        if self.config.id_loss:
            for name, logits in out.logits.items():
                losses[f"id_{name}"] = identity_loss(logits, labels, self.config.label_smoothing)
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of embeddings, and the evaluator's details (distances, indices) for plots."""
    evaluator = ReIDEvaluator(rerank=rerank, query_expansion=query_expansion, track_queries=track_queries)
    evaluator.process(embeddings, pids, camids, is_query)
    metrics = evaluator.evaluate()
    return metrics, evaluator.last


# -- after training: final evaluation, plots, report, bundle fields ------------------------------------

SUMMARY_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP", "map80", "map80_all_cameras")


def write_reid_outputs(
    model: nn.Module,
    eval_set: EvalSet,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    rerank: bool = False,
    query_expansion: int = QE_NEIGHBOURS,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``eval_set``; write ``val_metrics.json`` (or ``test_metrics.json``) and plots.

    The metrics are stored under the set's name (``validation`` / ``market_test``); with
    ``query_expansion`` (neighbours, 0 = off) also those of the service's alpha-QE under
    ``query_expansion``.
    """
    from training.plots.reid import plot_cmc, plot_ranked_lists, plot_tsne

    out_dir = Path(out_dir)
    plots = out_dir / ("plots_distractors" if eval_set.name.endswith("_distractors") else "plots")
    plots.mkdir(parents=True, exist_ok=True)
    images, pids, camids = eval_set.images, eval_set.pids, eval_set.camids
    embeddings = embed(model, images, device, batch_size, progress=progress, desc=eval_set.name)
    metrics, last = evaluate_embeddings(
        embeddings,
        pids,
        camids,
        eval_set.is_query,
        rerank=rerank,
        query_expansion=query_expansion,
        track_queries=True,
    )
    q, g = last["query"], last["gallery"]
    if (pids == DISTRACTOR_PID).sum() >= 4:  # for bundles trained on every identity, and to compare
        crops = embeddings.numpy()[pids == DISTRACTOR_PID]
        metrics["unlabelled_threshold"] = {
            "match_threshold": unlabelled_threshold(crops)["threshold"],
            "match_threshold_expanded": unlabelled_threshold(crops, query_expansion=query_expansion)[
                "threshold"
            ],
            "crops": len(crops),
        }
    result = {
        eval_set.name: metrics,
        "protocol": {
            "set": eval_set.name,
            "description": eval_set.note,
            "identities": len(set(pids[pids > 0].tolist())),
            "images": len(pids),
            "distractors": int((pids == DISTRACTOR_PID).sum()),
            "queries": len(q),
            "gallery": len(g),
            "scored_queries": metrics["num_queries"],
            "exclusion": "same identity and same camera, and junk (pid -1) (Market-1501)",
        },
    }
    file = "val_metrics.json" if eval_set.name == "validation" else f"{eval_set.name}_metrics.json"
    (out_dir / file).write_text(json.dumps(result, indent=1) + "\n")
    curves = {"cosine": metrics["cmc"]}
    if rerank:
        curves["k-reciprocal re-ranking"] = last["rerank_cmc"]
    plot_cmc(curves, plots / "cmc.png")
    people = pids > 0  # distractors are many people under one pid: not an identity to plot
    plot_tsne(embeddings.numpy()[people], pids[people], plots / "tsne.png")
    plot_ranked_lists(
        images[q],
        images[g],
        last["distmat"],
        pids[q],
        pids[g],
        camids[q],
        camids[g],
        plots / "ranked_lists.png",
    )
    return result


def finish_reid_run(task: ReIDTask, run_dir: str | Path, *, rerank: bool = False) -> dict[str, Any]:
    """Evaluate the best checkpoint; write val_metrics.json, plots and report.md into the run."""
    from training.engine import BEST, METRICS_FILE, load_checkpoint
    from training.plots.curves import plot_curves

    run_dir = Path(run_dir)
    best = load_checkpoint(run_dir / BEST)
    task.model.load_state_dict(best["model"])
    task.model.to(task.device)
    result = write_reid_outputs(
        task.model,
        task.data.validation_set(task.config.eval_seed),
        run_dir,
        device=task.device,
        batch_size=task.config.eval_batch_size,
        rerank=rerank,
    )
    result["best_epoch"] = best["epoch"]
    result["images"] = {"train": len(task.data.train), "val": len(task.data.val)}
    trained = len(set(task.data.train_pids.tolist()))
    result["identities"] = {"train": trained, "val": len(task.data.split.val_ids)}
    if task.config.train_all:  # the numbers say how well it fits, not how well it generalises
        result["protocol"]["description"] += "; these identities were trained on (--train-all)"
    (run_dir / "val_metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    history = json.loads((run_dir / METRICS_FILE).read_text())
    plots = run_dir / "plots"
    losses = [
        "train_loss",
        "val_loss",
        "train_triplet_avg",
        "train_triplet_max",
        "train_id_avg",
        "train_id_max",
    ]
    plot_curves(history, plots / "loss.png", losses, title="Loss")
    plot_curves(history, plots / "retrieval.png", ["rank1", "mAP", "mINP", "map80"], title="Validation")
    (run_dir / "report.md").write_text(reid_report(task.config, result, history))
    return result


def reid_report(config: ReIDTrainConfig, result: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """A short markdown report linking the plots."""
    val, proto = result["validation"], result["protocol"]
    seconds = [r["seconds"] for r in history]
    speed = [r["images_per_s"] for r in history]
    loss = "lambda (T_max + T_avg" + (" + CE_max + CE_avg)" if config.id_loss else ")")
    lines = [
        "# Re-ID run",
        "",
        f"- Recipe `{config.recipe}`: {config.triplet} triplet loss, margin {config.margin}, "
        f"loss = {loss} with lambda {config.loss_lambda}, label smoothing {config.label_smoothing}",
        f"- Backbone `{config.backbone}`, input {config.input_size[0]}x{config.input_size[1]}, last stride "
        f"{config.last_stride}, branch dim {config.branch_dim}, init weights `{config.init_weights}`",
        f"- Data `{config.data_root}` ({config.layout} layout, "
        f"fingerprint `{config.data_fingerprint[:12]}`): "
        f"{result['identities']['train']} / {result['identities']['val']} identities, "
        f"{result['images']['train']} / {result['images']['val']} images (train / validation)",
        f"- {len(history)} epochs, best epoch {result['best_epoch']} (by `{config.monitor}`); "
        f"{sum(seconds) / max(len(seconds), 1):.0f} s per epoch, "
        f"{sum(speed) / max(len(speed), 1):.0f} training images/s",
        "",
        "## Validation (best epoch, Market-1501 protocol)",
        "",
        f"{proto['description']}: {proto['queries']} queries ({proto['scored_queries']} scored), "
        f"{proto['gallery']} gallery images.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {val[k]:.4f} |" for k in SUMMARY_KEYS]
    lines.append(
        f"| match threshold (cosine, 1% false matches) | {val['match_threshold']:.4f} "
        f"(true-match rate {val['true_match_rate_at_threshold']:.3f}) |"
    )
    if "rerank" in val:
        rr = val["rerank"]
        lines += [
            "",
            f"With k-reciprocal re-ranking: rank-1 {rr['rank1']:.4f}, mAP {rr['mAP']:.4f}, "
            f"mINP {rr['mINP']:.4f} ({rr['rerank_seconds']:.1f} s, {rr['rerank_peak_mb']:.0f} MB peak).",
        ]
    lines += [
        "",
        "`map80` is the report's course metric (AP over the first 80 results); `map80_all_cameras` keeps "
        "same-camera matches, as the report's evaluation did. Definitions: `training/evaluation/reid.py`.",
        "",
        "## Plots",
        "",
        "![loss](plots/loss.png) ![validation](plots/retrieval.png)",
        "",
        "![CMC](plots/cmc.png) ![t-SNE](plots/tsne.png)",
        "",
        "![ranked lists](plots/ranked_lists.png)",
        "",
    ]
    return "\n".join(lines)


def manifest_fields(
    checkpoint: dict[str, Any], run_dir: str | Path, metrics_from: Any = None
) -> dict[str, Any]:
    """Bundle fields of a re-ID run (``training/export.py``): embedding, match threshold, metrics.

    The identity classifiers are training-only: this drops them from ``checkpoint`` in place (weights,
    and ``num_classes`` = 0 in its architecture) so the bundle holds the embedding network alone.
    A ``--train-all`` run has no unseen identities left to measure: its metrics, threshold and query
    expansion come from ``metrics_from``, the manifest of the same recipe's run on the split, until
    ``evaluate-reid --distractors --record`` re-estimates the thresholds for these weights.
    """
    classes = checkpoint["architecture"].get("num_classes")  # the training identities
    checkpoint["architecture"] = {**checkpoint["architecture"], "num_classes": 0}
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if ".classifier." not in k}
    dim = 2 * int(checkpoint["model"]["branches.avg.neck.weight"].shape[0])
    embedding = {"dim": dim, "normalized": True, "distance": "cosine"}
    if checkpoint.get("config", {}).get("train_all"):
        if metrics_from is None:
            raise ValueError(
                "a --train-all run saw every identity, so it has no validation of its own: pass "
                "--metrics-from BUNDLE, the bundle of the same recipe trained on the split"
            )
        metrics = {
            **metrics_from.metrics,
            "best_epoch": checkpoint["epoch"],
            "trained_on": "every identity (--train-all); validation metrics are the split run's",
            "metrics_from": f"{metrics_from.name} {metrics_from.version}",
        }
        if classes:
            metrics["identities"] = classes
        fields = {"embedding": embedding, "match_threshold": metrics_from.match_threshold, "metrics": metrics}
        if metrics_from.query_expansion is not None:
            fields["query_expansion"] = metrics_from.query_expansion.model_dump()
        return fields
    metrics = {k: v for k, v in checkpoint["metrics"].items() if isinstance(v, int | float)}
    final = Path(run_dir) / "val_metrics.json"
    if final.is_file():  # the best epoch re-evaluated after training
        saved = json.loads(final.read_text())
        metrics = {k: v for k, v in saved["validation"].items() if isinstance(v, int | float)}
        metrics["protocol"] = saved.get("protocol", {})
    metrics["best_epoch"] = checkpoint["epoch"]
    fields = {
        "embedding": embedding,
        "match_threshold": metrics.get("match_threshold"),
        "metrics": metrics,
    }
    if final.is_file() and "query_expansion" in saved["validation"]:
        fields["query_expansion"] = query_expansion_spec(saved["validation"])
    return fields


def query_expansion_spec(validation: dict[str, Any], **protocols: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``query_expansion`` section from evaluated metrics: the threshold of the plain
    validation protocol (as the plain ``match_threshold``), and mAP / rank-1 with and without it for
    that protocol and any other (``validation_distractors=...``)."""
    qe = validation["query_expansion"]
    measured = {"validation": validation, **protocols}
    return {
        "neighbours": qe["neighbours"],
        "match_threshold": qe["match_threshold"],
        "metrics": {
            name: {
                "mAP": m["mAP"],
                "rank1": m["rank1"],
                "mAP_expanded": m["query_expansion"]["mAP"],
                "rank1_expanded": m["query_expansion"]["rank1"],
            }
            for name, m in measured.items()
            if "query_expansion" in m
        },
    }
