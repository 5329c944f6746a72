"""Attribute metrics: per-group accuracy, label-based mA, instance-based precision/recall/F1, confusions.

Definitions (``N`` validation images; each image has one true and one predicted class per group):

- ``accuracy/<group>``: fraction of images whose predicted class is the true class.
  ``mean_accuracy``: the mean of the 12 group accuracies (the Market-1501_Attribute protocol and the
  report's "mean accuracy").
- ``balanced_accuracy/<group>``: the mean, over the classes that occur in the ground truth, of that
  class's recall. For a binary group this is exactly (TPR + TNR) / 2.
- ``mA``: the mean of the 12 balanced accuracies. Each group enters once, whatever its number of
  classes: a binary group with its (TPR + TNR) / 2, age and the two colour groups with their balanced
  accuracy (the mean per-class recall over 4, 9 and 10 classes).
- ``mA_binary``: label-based mA in the pedestrian-attribute literature's form, over the 30 binary
  attributes of the annotation coding (``binary_attribute_names``): the 9 binary groups (positive = the
  CSV's value 2: female, long hair, short sleeves, short lower-body clothing, pants, hat, backpack, bag,
  handbag), age one-hot (4) and the 8 upper and 9 lower colours (multicolour = no colour bit set).
  Per attribute (TPR + TNR) / 2, averaged; an attribute with no positive (or no negative) image in the
  ground truth contributes its TNR (or TPR) alone.
- ``mA_two_class``: the mean balanced accuracy of the 9 two-class groups alone (gender, hair, sleeve
  length, lower length, lower type, hat, backpack, bag, handbag): the mA our independent test reports.
- Instance-based (Li et al. 2015, the PAR survey's form) over the same 30-bit vectors, per image with
  true set Y and predicted set P: accuracy |Y∩P| / |Y∪P|, precision |Y∩P| / |P|, recall |Y∩P| / |Y|,
  each averaged over images (an empty denominator counts as 0; age guarantees |Y|, |P| >= 1);
  ``instance_f1`` = 2 P R / (P + R) of the averaged precision P and recall R.
- ``confusion/<group>``: counts, rows = true class, columns = predicted class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from app.attribute_schema import ATTRIBUTE_GROUPS, AttributeGroup

CONFUSION_GROUPS = ("age", "upper_colour", "lower_colour")


def binary_attribute_names(groups: Sequence[AttributeGroup] = ATTRIBUTE_GROUPS) -> list[str]:
    """The 30 binary attributes of the annotation coding, as ``group=class``."""
    names = []
    for g in groups:
        if g.num_classes == 2:
            names.append(f"{g.name}={g.classes[1]}")
        elif g.is_colour:
            names += [f"{g.name}={c}" for c in g.classes[:-1]]  # multicolour has no bit of its own
        else:
            names += [f"{g.name}={c}" for c in g.classes]
    return names


def binarise(labels: torch.Tensor, groups: Sequence[AttributeGroup] = ATTRIBUTE_GROUPS) -> torch.Tensor:
    """(N, groups) class indices -> (N, 30) bool in the order of :func:`binary_attribute_names`."""
    parts = []
    for j, g in enumerate(groups):
        column = labels[:, j]
        if g.num_classes == 2:
            parts.append((column == 1).unsqueeze(1))
        else:
            width = g.num_classes - 1 if g.is_colour else g.num_classes
            parts.append(column.unsqueeze(1) == torch.arange(width, device=labels.device))
    return torch.cat(parts, dim=1)


def confusion_matrix(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class."""
    index = true.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes**2).view(num_classes, num_classes)


def balanced_accuracy(confusion: torch.Tensor) -> float:
    """Mean recall over the classes present in the ground truth."""
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    recall = confusion.diag()[present].double() / support[present].double()
    return float(recall.mean())


def label_based_ma(true_bits: torch.Tensor, pred_bits: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean over attributes of (TPR + TNR) / 2, and the per-attribute values."""
    t, p = true_bits.bool(), pred_bits.bool()
    pos, neg = t.sum(0).double(), (~t).sum(0).double()
    tpr = (t & p).sum(0).double() / pos.clamp_min(1)
    tnr = (~t & ~p).sum(0).double() / neg.clamp_min(1)
    per = torch.where(pos == 0, tnr, torch.where(neg == 0, tpr, (tpr + tnr) / 2))
    return float(per.mean()), per


def instance_metrics(true_bits: torch.Tensor, pred_bits: torch.Tensor) -> dict[str, float]:
    """Instance-based accuracy, precision, recall and F1 over binary attribute vectors."""
    t, p = true_bits.bool(), pred_bits.bool()
    inter = (t & p).sum(1).double()
    union, n_true, n_pred = (t | p).sum(1).double(), t.sum(1).double(), p.sum(1).double()

    def ratio(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.where(b > 0, a / b.clamp_min(1), torch.zeros_like(a)).mean())

    precision, recall = ratio(inter, n_pred), ratio(inter, n_true)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "instance_accuracy": ratio(inter, union),
        "instance_precision": precision,
        "instance_recall": recall,
        "instance_f1": f1,
    }


class AttributeEvaluator:
    """Accumulates predictions batch by batch: ``reset()``, ``process(logits, targets)``, ``evaluate()``."""

    def __init__(self, groups: Sequence[AttributeGroup] = ATTRIBUTE_GROUPS) -> None:
        self.groups = tuple(groups)
        self.reset()

    def reset(self) -> None:
        self._true: list[torch.Tensor] = []
        self._pred: list[torch.Tensor] = []

    def process(
        self, logits: Mapping[str, torch.Tensor], targets: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> None:
        """``logits``: group -> (B, classes); ``targets``: (B, groups) class indices or group -> (B,)."""
        pred = torch.stack([logits[g.name].argmax(1) for g in self.groups], dim=1)
        if isinstance(targets, Mapping):
            targets = torch.stack([targets[g.name] for g in self.groups], dim=1)
        self.process_predictions(pred, targets)

    def process_predictions(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Class indices directly: both (B, groups)."""
        self._pred.append(pred.detach().long().cpu())
        self._true.append(true.detach().long().cpu())

    def evaluate(self, *, confusion: bool = False) -> dict[str, Any]:
        """Scalar metrics (module docstring); with ``confusion``, also matrices as nested lists."""
        if not self._true:
            raise RuntimeError("no predictions processed")
        true, pred = torch.cat(self._true), torch.cat(self._pred)
        out: dict[str, Any] = {}
        accuracies, balanced, matrices = [], [], {}
        for j, g in enumerate(self.groups):
            matrix = confusion_matrix(true[:, j], pred[:, j], g.num_classes)
            matrices[g.name] = matrix
            accuracies.append(float((true[:, j] == pred[:, j]).double().mean()))
            balanced.append(balanced_accuracy(matrix))
        out["mean_accuracy"] = sum(accuracies) / len(accuracies)
        out["mA"] = sum(balanced) / len(balanced)
        two_class = [b for g, b in zip(self.groups, balanced, strict=True) if g.num_classes == 2]
        if two_class:
            out["mA_two_class"] = sum(two_class) / len(two_class)
        true_bits, pred_bits = binarise(true, self.groups), binarise(pred, self.groups)
        out["mA_binary"], _ = label_based_ma(true_bits, pred_bits)
        out.update(instance_metrics(true_bits, pred_bits))
        for g, acc, bal in zip(self.groups, accuracies, balanced, strict=True):
            out[f"accuracy/{g.name}"] = acc
            out[f"balanced_accuracy/{g.name}"] = bal
        if confusion:
            out["confusion"] = {name: m.tolist() for name, m in matrices.items()}
            _, per = label_based_ma(true_bits, pred_bits)
            out["mA_binary_per_attribute"] = dict(
                zip(binary_attribute_names(self.groups), per.tolist(), strict=True)
            )
            out["count"] = len(true)
        return out


def majority_baseline(train_labels: torch.Tensor, val_labels: torch.Tensor) -> dict[str, Any]:
    """Metrics of always predicting each group's most frequent training class (the floor to beat)."""
    majority = torch.stack(
        [
            torch.bincount(train_labels[:, j], minlength=g.num_classes).argmax()
            for j, g in enumerate(ATTRIBUTE_GROUPS)
        ]
    )
    evaluator = AttributeEvaluator()
    evaluator.process_predictions(majority.expand_as(val_labels), val_labels)
    return evaluator.evaluate()


# Logit adjustment (Menon et al. 2021, post-hoc form): subtracting tau * log(class prior) from a head's
# logits moves its decisions from the most likely class towards balanced recall. tau = 0 is plain
# argmax (best accuracy); tau = 1 optimises balanced accuracy for a calibrated model. The shift is a
# constant per class, so it folds into the head's bias at export and costs nothing at inference.
LOGIT_ADJUST_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)


def log_priors(
    train_labels: torch.Tensor, groups: Sequence[AttributeGroup] = ATTRIBUTE_GROUPS
) -> dict[str, torch.Tensor]:
    """Per group, the log of each class's share of the training images (add-one smoothed)."""
    priors = {}
    for j, g in enumerate(groups):
        counts = torch.bincount(train_labels[:, j], minlength=g.num_classes).double() + 1.0
        priors[g.name] = (counts / counts.sum()).log().float()
    return priors


def adjust_logits(
    logits: Mapping[str, torch.Tensor],
    log_prior: Mapping[str, torch.Tensor],
    tau: float | Mapping[str, float],
) -> dict[str, torch.Tensor]:
    """``logits - tau * log_prior`` per group; ``tau`` is one value or one per group."""
    taus = tau if isinstance(tau, Mapping) else dict.fromkeys(logits, tau)
    return {name: value - taus[name] * log_prior[name].to(value) for name, value in logits.items()}


def per_group_taus(tradeoff: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per group, the tau of the trade-off table with the largest accuracy + balanced accuracy of that
    group (ties go to the smaller tau): the global rule's criterion, applied group by group, so a rare
    class (a hat) gets a strong adjustment without costing the balanced groups accuracy."""
    rows = sorted(tradeoff, key=lambda r: r["tau"])
    return {
        g.name: max(rows, key=lambda r: r[f"accuracy/{g.name}"] + r[f"balanced_accuracy/{g.name}"])["tau"]
        for g in ATTRIBUTE_GROUPS
    }


def logit_adjustment_tradeoff(
    logits: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    log_prior: Mapping[str, torch.Tensor],
    taus: Sequence[float] = LOGIT_ADJUST_TAUS,
) -> list[dict[str, float]]:
    """Validation metrics at each tau: one row per tau, ``{"tau": tau, **scalar metrics}``."""
    rows = []
    for tau in taus:
        rows.append({"tau": float(tau), **adjusted_metrics(logits, labels, log_prior, tau)})
    return rows


def adjusted_metrics(
    logits: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    log_prior: Mapping[str, torch.Tensor],
    tau: float | Mapping[str, float],
) -> dict[str, Any]:
    """Scalar metrics of the logits after :func:`adjust_logits`."""
    evaluator = AttributeEvaluator()
    evaluator.process(adjust_logits(logits, log_prior, tau), labels)
    return evaluator.evaluate()
