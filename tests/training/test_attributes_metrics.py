"""Attribute metrics and class weights on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from app.attribute_schema import ATTRIBUTE_GROUPS
from training.evaluation.attributes import (
    AttributeEvaluator,
    balanced_accuracy,
    binarise,
    binary_attribute_names,
    confusion_matrix,
    instance_metrics,
    label_based_ma,
    majority_baseline,
)
from training.tasks.attributes import class_counts, class_weights

NAMES = [g.name for g in ATTRIBUTE_GROUPS]


def labels(**overrides: int) -> dict[str, int]:
    return {**{n: 0 for n in NAMES}, **overrides}


def test_class_weights_majority_over_count():
    rows = [labels(gender=0)] * 6 + [labels(gender=1)] * 2 + [labels(age=1)] * 1 + [labels(age=3)] * 1
    counts = class_counts(rows)
    assert counts["gender"] == [8, 2] and counts["age"] == [8, 1, 0, 1]
    weights = class_weights(rows)
    assert weights["gender"].tolist() == [1.0, 4.0]
    assert weights["age"].tolist() == [1.0, 8.0, 1.0, 8.0]  # absent class -> 1
    assert weights["upper_colour"].tolist() == [1.0] * 9


def test_sqrt_class_weights_in_the_task(course_root, tmp_path):
    from training.config import AttributeTrainConfig
    from training.tasks.attributes import AttributeTask, load_attribute_data

    cfg = AttributeTrainConfig(data_root=str(course_root), input_size=(32, 16), cache_dir="", progress=False)
    data = load_attribute_data(cfg, tmp_path)
    full = AttributeTask(cfg, data).weights
    root = AttributeTask(cfg.replace(class_weights="sqrt"), data).weights
    none = AttributeTask(cfg.replace(class_weights="none"), data).weights
    for name, w in full.items():
        torch.testing.assert_close(root[name], w.sqrt())
        assert none[name].tolist() == [1.0] * len(w)
    assert any(w.max() > 1 for w in full.values())
    with pytest.raises(ValueError, match="sqrt"):
        cfg.replace(class_weights="inverse")


def test_confusion_and_balanced_accuracy():
    true = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 0, 2])
    m = confusion_matrix(true, pred, 4)
    assert m.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    # recalls 2/3, 1/2, 1/1 over the three classes present (class 3 absent is left out)
    assert balanced_accuracy(m) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_binary_balanced_accuracy_is_tpr_tnr_mean():
    true = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1])
    tpr, tnr = 3 / 4, 4 / 6
    assert balanced_accuracy(confusion_matrix(true, pred, 2)) == pytest.approx((tpr + tnr) / 2)


def test_binarised_vector_follows_the_csv_coding():
    names = binary_attribute_names()
    assert len(names) == 30
    assert names[:2] == ["gender=female", "hair=long"] and "age=old" in names
    assert "upper_colour=multicolour" not in names and names[-1] == "lower_colour=brown"
    row = torch.tensor([[labels(gender=1, age=2, upper_colour=8, lower_colour=3)[n] for n in NAMES]])
    bits = dict(zip(names, binarise(row)[0].tolist(), strict=True))
    on = {k for k, v in bits.items() if v}
    assert on == {"gender=female", "age=adult", "lower_colour=purple"}  # multicolour sets no bit


def test_label_based_ma_with_degenerate_attribute():
    true = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 0]], dtype=torch.bool)
    ma, per = label_based_ma(true, pred)
    # attribute 0: TPR 1/2, TNR 1/2 -> 0.5; attribute 1 has no positive: TNR 3/4 alone
    assert per.tolist() == pytest.approx([0.5, 0.75]) and ma == pytest.approx(0.625)


def test_instance_metrics_hand_computed():
    true = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    m = instance_metrics(true, pred)
    # image 1: |Y∩P| 1, |Y∪P| 3, |P| 2, |Y| 2; image 2: all 1
    assert m["instance_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["instance_precision"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["instance_recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["instance_f1"] == pytest.approx(0.75)


def one_hot_logits(pred: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        g.name: torch.nn.functional.one_hot(pred[:, j], g.num_classes).float()
        for j, g in enumerate(ATTRIBUTE_GROUPS)
    }


def test_evaluator_perfect_and_accumulating():
    true = torch.tensor([[j % g.num_classes for j, g in enumerate(ATTRIBUTE_GROUPS)], [1] * 12])
    ev = AttributeEvaluator()
    ev.process(one_hot_logits(true[:1]), true[:1])
    ev.process(one_hot_logits(true[1:]), {n: true[1:, j] for j, n in enumerate(NAMES)})
    out = ev.evaluate(confusion=True)
    for key in ("mean_accuracy", "mA", "mA_binary", "instance_accuracy", "instance_f1"):
        assert out[key] == pytest.approx(1.0), key
    assert out["count"] == 2 and len(out["confusion"]["age"]) == 4
    ev.reset()
    with pytest.raises(RuntimeError):
        ev.evaluate()


def test_evaluator_group_means():
    true = torch.zeros(4, 12, dtype=torch.long)
    true[:2, 0] = 1  # gender: 2 female, 2 male
    pred = torch.zeros(4, 12, dtype=torch.long)  # always class 0
    ev = AttributeEvaluator()
    ev.process_predictions(pred, true)
    out = ev.evaluate()
    assert out["accuracy/gender"] == 0.5 and out["balanced_accuracy/gender"] == 0.5
    assert out["mean_accuracy"] == pytest.approx((0.5 + 11) / 12)
    assert out["mA"] == pytest.approx((0.5 + 11) / 12)  # other groups: one class present, recall 1


def test_majority_baseline():
    train = torch.zeros(5, 12, dtype=torch.long)
    train[:3, 0] = 1  # female is the training majority
    val = torch.tensor([[1] + [0] * 11, [0] * 12])
    out = majority_baseline(train, val)
    assert out["accuracy/gender"] == 0.5 and out["accuracy/hair"] == 1.0


def test_per_group_taus_pick_each_groups_best_tau():
    """Each group gets the tau with its largest accuracy + balanced accuracy; ties go to the smaller tau."""
    from training.evaluation.attributes import per_group_taus

    def row(tau, hat, gender):
        r = {"tau": tau}
        for g in ATTRIBUTE_GROUPS:
            acc, bal = {"hat": hat, "gender": gender}.get(g.name, (0.5, 0.5))
            r[f"accuracy/{g.name}"], r[f"balanced_accuracy/{g.name}"] = acc, bal
        return r

    rows = [
        row(1.0, (0.85, 0.75), (0.80, 0.80)),
        row(0.0, (0.96, 0.50), (0.88, 0.87)),
        row(0.5, (0.90, 0.65), (0.85, 0.84)),
    ]
    taus = per_group_taus(rows)
    assert taus["hat"] == 1.0 and taus["gender"] == 0.0 and taus["age"] == 0.0  # age: all tied
