"""The attribute task for the Trainer: the report's multi-head classifier and class-weighted loss.

Model (``app.nets.attributes.AttributeNet``): a backbone, global average pooling, one head per group
(Dropout 0.2 + Linear with 2 / 4 / 9 / 10 outputs). Loss: per head, cross-entropy weighted by
``majority count / class count`` (the report's class weights; ``sqrt`` takes their square root,
``none`` drops them), summed over the 12 heads
(``training.losses.MultiHeadCrossEntropy``). Defaults (the report): Adam lr 1e-4, weight decay 5e-4,
batch 128, up to 100 epochs, early stopping after 5 epochs without a lower validation loss.

Class weights are counted over the training split's identities, one count per identity as in the
report (which counted rows of the annotation file); a class absent from training gets weight 1.

After training, :func:`finish_attribute_run` evaluates the best checkpoint on the validation split and
writes ``val_metrics.json``, the plots and ``report.md`` into the run directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.attribute_schema import ATTRIBUTE_GROUPS, Labels
from app.nets.attributes import AttributeNet, AttributeNetConfig
from training.config import AttributeTrainConfig
from training.data.cache import cached_images
from training.data.market import MarketData, Sample, load_market
from training.data.split import Split, resolve_split
from training.data.transforms import BatchAugment, to_model_input
from training.engine import Batches
from training.evaluation.attributes import (
    AttributeEvaluator,
    adjusted_metrics,
    log_priors,
    logit_adjustment_tradeoff,
    majority_baseline,
    per_group_taus,
)
from training.losses import MultiHeadCrossEntropy, identity_loss
from training.warm_start import is_bundle_dir, warm_start_from_reid

GROUP_NAMES = tuple(g.name for g in ATTRIBUTE_GROUPS)


def class_counts(labels: Sequence[Labels]) -> dict[str, list[int]]:
    """Per group, how many of ``labels`` fall in each class."""
    counts = {g.name: [0] * g.num_classes for g in ATTRIBUTE_GROUPS}
    for lab in labels:
        for g in ATTRIBUTE_GROUPS:
            counts[g.name][lab[g.name]] += 1
    return counts


def class_weights(labels: Sequence[Labels]) -> dict[str, torch.Tensor]:
    """The report's weights: per group, majority-class count / class count (absent class: 1)."""
    weights = {}
    for name, counts in class_counts(labels).items():
        top = max(counts)
        weights[name] = torch.tensor([top / c if c else 1.0 for c in counts], dtype=torch.float32)
    return weights


def label_matrix(samples: Sequence[Sample], attributes: Mapping[int, Labels]) -> torch.Tensor:
    """(N, 12) int64 class indices of each sample's identity, in ``ATTRIBUTE_GROUPS`` order."""
    return torch.tensor(
        [[attributes[s.pid][n] for n in GROUP_NAMES] for s in samples], dtype=torch.long
    ).view(-1, len(GROUP_NAMES))


@dataclass
class AttributeData:
    """Training and validation images (uint8 caches) with their (N, 12) labels."""

    train: list[Sample]
    val: list[Sample]
    train_images: torch.Tensor
    val_images: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    split: Split
    data: MarketData

    def train_identity_labels(self) -> list[Labels]:
        return [self.data.attributes[pid] for pid in sorted({s.pid for s in self.train})]

    def train_identities(self) -> torch.Tensor:
        """Each training image's identity as a class index 0..n-1 (for the APR identity loss)."""
        index = {pid: i for i, pid in enumerate(sorted({s.pid for s in self.train}))}
        return torch.tensor([index[s.pid] for s in self.train], dtype=torch.long)


def load_attribute_data(config: AttributeTrainConfig, run_dir: str | Path) -> AttributeData:
    """Read the dataset, apply ``limit_ids``, reuse or make the split, decode into the cache.

    ``config.layout`` and ``config.data_fingerprint`` are filled in (the saved config records them);
    a resumed run whose data changed is refused.
    """
    data = load_market(config.data_root, config.layout)
    if config.data_fingerprint and config.data_fingerprint != data.fingerprint:
        raise ValueError(
            f"{config.data_root}: the data changed since this run started "
            f"(fingerprint {data.fingerprint[:12]} != {config.data_fingerprint[:12]})"
        )
    config.layout, config.data_fingerprint = data.layout, data.fingerprint
    data = data.limit_train_ids(config.limit_ids, config.seed)
    labels = {pid: data.attributes[pid] for pid in data.train_ids}
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
    cache = config.cache_dir or None
    images = cached_images(
        [s.path for s in data.train],
        config.input_size,
        cache,
        workers=config.workers,
        progress=config.progress,
    )
    row = {s.path: i for i, s in enumerate(data.train)}
    return AttributeData(
        train,
        val,
        images[[row[s.path] for s in train]],
        images[[row[s.path] for s in val]],
        label_matrix(train, data.attributes),
        label_matrix(val, data.attributes),
        split,
        data,
    )


def build_attribute_net(config: AttributeTrainConfig) -> AttributeNet:
    """The untrained network of ``config``: init weights from a file, or a re-ID bundle's backbone."""
    net_config = AttributeNetConfig(
        backbone=config.backbone,
        input_size=config.input_size,
        dropout=config.dropout,
        last_stride=config.last_stride,
        stripes=config.stripes,
        max_pool=config.max_pool,
    )
    if is_bundle_dir(config.init_weights):
        net = AttributeNet(net_config)
        warm_start_from_reid(net, str(config.init_weights))
        return net
    return AttributeNet(net_config, init_weights=config.init_weights)


class AttributeTask:
    """Model, batches, loss and validation of an attribute run (the Trainer's Task protocol)."""

    name = "attributes"

    def __init__(
        self,
        config: AttributeTrainConfig,
        data: AttributeData,
        *,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
        model: AttributeNet | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.model = model or build_attribute_net(config)
        if config.class_weights in ("majority", "sqrt"):
            self.weights = class_weights(data.train_identity_labels())
            if config.class_weights == "sqrt":
                self.weights = {k: w.sqrt() for k, w in self.weights.items()}
        else:
            self.weights = {g.name: torch.ones(g.num_classes) for g in ATTRIBUTE_GROUPS}
        self.criterion = MultiHeadCrossEntropy(self.weights, config.label_smoothing).to(self.device)
        # Validation loss without smoothing, so that runs with and without it compare.
        self.val_criterion = MultiHeadCrossEntropy(self.weights).to(self.device)
        self.epoch = 0
        self.identities = data.train_identities()
        # Training only: not part of the model, so neither best.pt's model nor the bundle carries it.
        self.id_head: nn.Linear | None = None
        if config.id_loss_weight > 0:
            n_ids = int(self.identities.max()) + 1 if len(self.identities) else 0
            self.id_head = nn.Linear(self.model.feature_dim, n_ids).to(self.device)
        self.augment = BatchAugment(
            flip_p=0.5 if config.flip else 0.0,
            pad=config.pad,
            erase_p=config.erase_p,
            channels_last=channels_last,
        )

    # Trainer protocol ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.id_head is not None:
            params += list(self.id_head.parameters())
        return [{"params": params}]

    def state_dict(self) -> dict[str, Any]:
        return {"id_head": self.id_head.state_dict()} if self.id_head is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.id_head is not None and "id_head" in state:
            self.id_head.load_state_dict(state["id_head"])

    def train_batches(self, epoch: int) -> Batches:
        """Shuffled batches; the order depends on (seed, epoch) only, so a resumed epoch repeats it."""
        self.epoch = epoch
        n, bs = len(self.data.train), self.config.batch_size
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        chunks = [order[start : start + bs] for start in range(0, n, bs)]
        chunks = [c for c in chunks if len(c) >= 2]  # BatchNorm cannot train on a single image
        data = self.data
        batches = ((data.train_images[c], data.train_labels[c], self.identities[c]) for c in chunks)
        return Batches(batches, len(chunks))

    def train_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels, identities = batch
        x = self.augment(images.to(self.device, non_blocking=True))
        feat = self.model.features(x)
        targets = self.targets(labels.to(self.device, non_blocking=True))
        out = self.criterion(self.model.classify(feat), targets)
        if self.id_head is not None:
            out["identity"] = identity_loss(
                self.id_head(feat), identities.to(self.device, non_blocking=True), label_smoothing=0.1
            )
            out["loss"] = out["loss"] + self.config.id_loss_weight * out["identity"]
        return out

    def validate(self) -> dict[str, float]:
        if self.config.train_all:
            return {"epoch": float(self.epoch)}
        metrics = self.evaluate()
        return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}

    # Evaluation --------------------------------------------------------------------------------------
    @staticmethod
    def targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: labels[:, j] for j, name in enumerate(GROUP_NAMES)}

    @torch.no_grad()
    def validation_logits(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Logits per group for every validation image (on the CPU) and their (N, 12) labels."""
        self.model.eval()
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in GROUP_NAMES}
        bs = self.config.eval_batch_size
        for start in range(0, len(self.data.val), bs):
            x = to_model_input(self.data.val_images[start : start + bs], self.device, self.channels_last)
            for name, value in self.model(x).items():
                parts[name].append(value.float().cpu())
        return {name: torch.cat(values) for name, values in parts.items()}, self.data.val_labels

    def evaluate(self, *, confusion: bool = False) -> dict[str, Any]:
        """Validation loss (the training loss over the whole validation set) and the metrics."""
        return self.score(*self.validation_logits(), confusion=confusion)

    @torch.no_grad()
    def score(
        self, logits: dict[str, torch.Tensor], labels: torch.Tensor, *, confusion: bool = False
    ) -> dict[str, Any]:
        """Loss and metrics of already computed validation logits."""
        evaluator = AttributeEvaluator()
        evaluator.process(logits, labels)
        on_device = {name: value.to(self.device) for name, value in logits.items()}
        loss = self.val_criterion(on_device, self.targets(labels.to(self.device)))["loss"]
        return {"val_loss": float(loss), **evaluator.evaluate(confusion=confusion)}


def finish_attribute_run(task: AttributeTask, run_dir: str | Path) -> dict[str, Any]:
    """Evaluate the best checkpoint on validation; write val_metrics.json, plots and report.md."""
    from training.engine import BEST, METRICS_FILE, load_checkpoint
    from training.plots.attributes import plot_class_balance, plot_confusion, plot_tradeoff
    from training.plots.curves import plot_curves

    run_dir = Path(run_dir)
    best = load_checkpoint(run_dir / BEST)
    task.model.load_state_dict(best["model"])
    task.model.to(task.device)
    logits, labels = task.validation_logits()  # one pass serves the metrics and the trade-off
    metrics = task.score(logits, labels, confusion=True)
    baseline = majority_baseline(task.data.train_labels, task.data.val_labels)
    priors = log_priors(task.data.train_labels)
    tradeoff = logit_adjustment_tradeoff(logits, labels, priors)
    taus = per_group_taus(tradeoff)  # chosen on this validation split, like the best epoch
    per_group = {"taus": taus, **adjusted_metrics(logits, labels, priors, taus)}
    result = {
        "best_epoch": best["epoch"],
        "validation": metrics,
        "majority_baseline": baseline,
        "logit_adjustment": {
            "log_priors": {k: v.tolist() for k, v in priors.items()},
            "tradeoff": tradeoff,
            "per_group": per_group,
        },
        "class_weights": {k: v.tolist() for k, v in task.weights.items()},
        "images": {"train": len(task.data.train), "val": len(task.data.val)},
        "identities": {"train": len(task.data.split.train_ids), "val": len(task.data.split.val_ids)},
    }
    (run_dir / "val_metrics.json").write_text(json.dumps(result, indent=1) + "\n")

    history = json.loads((run_dir / METRICS_FILE).read_text())
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    identity_labels = [
        task.data.data.attributes[p] for p in task.data.split.train_ids + task.data.split.val_ids
    ]
    plot_class_balance(class_counts(identity_labels), plots / "class_balance.png", unit="identities")
    plot_curves(history, plots / "loss.png", ["train_loss", "val_loss"], title="Loss")
    plot_curves(history, plots / "accuracy.png", ["mean_accuracy", "mA", "instance_f1"], title="Validation")
    plot_tradeoff(tradeoff, plots / "logit_adjustment.png")
    for group in ("age", "upper_colour", "lower_colour"):
        g = next(x for x in ATTRIBUTE_GROUPS if x.name == group)
        plot_confusion(metrics["confusion"][group], g.classes, plots / f"confusion_{group}.png", title=group)
    (run_dir / "report.md").write_text(attribute_report(task.config, result, history))
    return result


def _tradeoff_rows(adjustment: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{r['tau']:g}", r) for r in adjustment["tradeoff"]] + [("per-group", adjustment["per_group"])]


def attribute_report(
    config: AttributeTrainConfig, result: dict[str, Any], history: list[dict[str, Any]]
) -> str:
    """A short markdown report linking the plots."""
    val, base = result["validation"], result["majority_baseline"]
    seconds = [r["seconds"] for r in history]
    speed = [r["images_per_s"] for r in history]
    lines = [
        "# Attribute classifier run",
        "",
        f"- Backbone `{config.backbone}`, input {config.input_size[0]}x{config.input_size[1]}, "
        f"last stride {config.last_stride}, heads on the global average"
        + (" and max" if config.max_pool else "")
        + (f" and {config.stripes} horizontal stripes" if config.stripes else "")
        + f", init weights `{config.init_weights}`",
        f"- Data `{config.data_root}` ({config.layout} layout, "
        f"fingerprint `{config.data_fingerprint[:12]}`): "
        f"{result['identities']['train']} / {result['identities']['val']} identities, "
        f"{result['images']['train']} / {result['images']['val']} images (train / validation)",
        f"- {len(history)} epochs, best epoch {result['best_epoch']} "
        f"(by `{config.monitor}`, {config.monitor_mode}); "
        f"{sum(seconds) / max(len(seconds), 1):.0f} s per epoch, "
        f"{sum(speed) / max(len(speed), 1):.0f} training images/s",
        "",
        "## Validation metrics (best epoch)",
        "",
        "| metric | model | majority class |",
        "| --- | --- | --- |",
    ]
    summary = (
        "mean_accuracy",
        "mA",
        "mA_binary",
        "instance_accuracy",
        "instance_precision",
        "instance_recall",
    )
    for key in (*summary, "instance_f1"):
        lines.append(f"| {key} | {val[key]:.4f} | {base[key]:.4f} |")
    lines += ["", "| group | accuracy | balanced accuracy | majority accuracy |", "| --- | --- | --- | --- |"]
    for g in ATTRIBUTE_GROUPS:
        lines.append(
            f"| {g.name} | {val[f'accuracy/{g.name}']:.4f} | {val[f'balanced_accuracy/{g.name}']:.4f} "
            f"| {base[f'accuracy/{g.name}']:.4f} |"
        )
    lines += [
        "",
        "mA is the mean over the 12 groups of the balanced accuracy ((TPR + TNR) / 2 for binary groups); "
        "mA_binary is the literature's label-based mA over the 30 binary attributes; see "
        "`training/evaluation/attributes.py` for the exact definitions.",
        "",
        "## Logit adjustment (decision rule, chosen at export with `--logit-adjust TAU|per-group`)",
        "",
        "| tau | mean_accuracy | mA | mA_two_class | mA_binary | instance_f1 |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {label} | {r['mean_accuracy']:.4f} | {r['mA']:.4f} | {r['mA_two_class']:.4f} "
            f"| {r['mA_binary']:.4f} | {r['instance_f1']:.4f} |"
            for label, r in _tradeoff_rows(result["logit_adjustment"])
        ),
        "",
        "`per-group`: each group's tau chosen on this validation split by that group's accuracy + balanced "
        "accuracy: "
        + ", ".join(f"{k} {v:g}" for k, v in result["logit_adjustment"]["per_group"]["taus"].items()),
        "",
        "![logit adjustment](plots/logit_adjustment.png)",
        "",
        "## Plots",
        "",
        "![class balance](plots/class_balance.png)",
        "",
        "![loss](plots/loss.png) ![validation metrics](plots/accuracy.png)",
        "",
        "![age](plots/confusion_age.png) ![upper colour](plots/confusion_upper_colour.png) "
        "![lower colour](plots/confusion_lower_colour.png)",
        "",
        "Files: `config.json` (resolved config), `metrics.json` (per epoch), `val_metrics.json` (best epoch, "
        "with confusion matrices), `split.json`, `best.pt`, `last.pt`.",
        "",
    ]
    return "\n".join(lines)
