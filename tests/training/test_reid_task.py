"""The re-ID task: recipes, batches, the loss composition, validation; and that training learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.tasks.reid import RECIPES, ReIDTask, ReIDTrainConfig, branch_outputs
from training.tasks.reid_data import load_reid_data


def _config(root, tmp_path, recipe="modern", **kw):
    base = {"p": 4, "k": 2} if recipe == "modern" else {"batch_size": 8}
    return ReIDTrainConfig.from_recipe(
        recipe,
        data_root=str(root),
        cache_dir=str(tmp_path / "cache"),
        backbone="osnet_x0_25",
        input_size=(64, 32),
        progress=False,
        **{**base, **kw},
    )


@pytest.fixture(scope="module")
def data(course_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reid-data")
    return load_reid_data(_config(course_root, tmp), tmp / "run")


def test_recipes():
    report = ReIDTrainConfig.from_recipe("report")
    assert (report.triplet, report.margin, report.lr, report.weight_decay) == ("report", 10.0, 1e-4, 5e-4)
    assert (report.batch_size, report.epochs, report.patience, report.loss_lambda) == (32, 25, 5, 0.5)
    modern = ReIDTrainConfig.from_recipe("modern", margin=None, p=8)
    assert (modern.triplet, modern.margin, modern.label_smoothing) == ("batch_hard", 0.3, 0.1)
    assert modern.batch_size == 8 * 4 and modern.erase_p == 0.5 and modern.warmup_epochs > 0
    assert set(RECIPES) == {"report", "modern"}
    again = ReIDTrainConfig.from_dict(modern.to_dict())
    assert again == modern
    with pytest.raises(KeyError, match="available"):
        ReIDTrainConfig.from_recipe("nope")
    with pytest.raises(ValueError, match="classifier must be one of linear, cosine"):
        ReIDTrainConfig.from_recipe("modern", classifier="arcface")


def test_data_is_identity_disjoint(data):
    assert not set(data.train_pids.tolist()) & set(data.val_pids.tolist())
    assert data.train_images.shape == (len(data.train), 3, 64, 32)
    assert data.val_images.dtype == torch.uint8
    q = data.query_mask(0)
    pairs = {(p, c) for p, c, isq in zip(data.val_pids, data.val_camids, q, strict=True) if isq}
    assert len(pairs) == q.sum() == len(set(zip(data.val_pids, data.val_camids, strict=True)))


@pytest.mark.parametrize("recipe", ["report", "modern"])
def test_step_losses(course_root, tmp_path, data, recipe):
    torch.manual_seed(0)
    config = _config(course_root, tmp_path, recipe)
    task = ReIDTask(config, data)
    batch = next(iter(task.train_batches(1)))
    images, labels = batch
    assert len(images) == (3 * 8 if recipe == "report" else 4 * 2)
    if recipe == "report":  # anchors, positives, negatives stacked
        a, p, n = labels.chunk(3)
        assert (a == p).all() and (a != n).all()
    task.model.train()
    losses = task.train_step(batch)
    terms = ["triplet_avg", "triplet_max", "id_avg", "id_max"]
    assert set(losses) == {"loss", *terms}
    total = 0.5 * sum(losses[t] for t in terms)
    torch.testing.assert_close(losses["loss"], total)

    cosine = ReIDTask(config.replace(classifier="cosine"), data)
    out = cosine.model.train()(cosine.augment(images))
    assert all(v.abs().max() <= 1 + 1e-5 for v in out.logits.values())  # cosines, unscaled
    losses = cosine.train_step(batch)
    assert set(losses) == {"loss", *terms} and torch.isfinite(losses["loss"])

    striped = ReIDTask(config.replace(stripes=2), data)
    losses = striped.train_step(batch)
    assert set(losses) == {"loss", *terms, "id_stripe0", "id_stripe1"}  # parts: identity loss only
    torch.testing.assert_close(losses["loss"], 0.5 * sum(v for k, v in losses.items() if k != "loss"))
    with torch.no_grad():  # validation's one pass embeds as the exported network does
        feats, emb = branch_outputs(striped.model.eval(), data.val_images[:4])
        torch.testing.assert_close(emb, striped.model(data.val_images[:4]))
    assert set(feats) == {"avg", "max"}
    with pytest.raises(ValueError, match="stripes must be >= 0"):
        config.replace(stripes=-1)

    no_id = ReIDTask(config.replace(id_loss=False), data, model=task.model)
    losses = no_id.train_step(batch)
    assert set(losses) == {"loss", "triplet_avg", "triplet_max"}
    torch.testing.assert_close(losses["loss"], 0.5 * (losses["triplet_avg"] + losses["triplet_max"]))


def test_validate_and_one_pass_outputs(course_root, tmp_path, data):
    task = ReIDTask(_config(course_root, tmp_path), data)
    task.model.eval()
    x = data.val_images[:4]
    with torch.no_grad():
        feats, emb = branch_outputs(task.model, x)
        torch.testing.assert_close(emb, task.model(x))
    assert set(feats) == {"avg", "max"}
    metrics = task.validate()
    assert {"val_loss", "mAP", "rank1", "mINP", "map80", "match_threshold"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert 0 <= metrics["mAP"] <= 1 and np.isfinite(metrics["val_loss"])


def test_train_all_uses_every_identity(course_root, tmp_path, data):
    config = _config(course_root, tmp_path, train_all=True, patience=5)
    assert (config.monitor, config.monitor_mode, config.patience) == ("epoch", "max", 0)
    every = load_reid_data(config, tmp_path / "run")
    assert set(every.train_pids.tolist()) == set(data.train_pids.tolist()) | set(data.val_pids.tolist())
    task = ReIDTask(config, every)
    list(task.train_batches(3))
    assert task.validate() == {"epoch": 3.0}  # seen identities: nothing to validate on


def test_distractor_validation_every_n_epochs(course_root, tmp_path, data):
    from tests.synthetic import make_course_dataset

    make_course_dataset(tmp_path / "other", n_ids=6, images_per_id=4, seed=9)
    config = _config(
        course_root, tmp_path, distractors=str(tmp_path / "other" / "train"), distractor_every=2, epochs=5
    )
    task = ReIDTask(config, data)
    assert task.distractor_images is not None and len(task.distractor_images) == 24
    seen = {}
    for epoch in (1, 2, 5):
        task.train_batches(epoch)
        seen[epoch] = task.validate()
    assert "distractors_mAP" not in seen[1]  # only every 2nd epoch and at the last one
    for epoch in (2, 5):
        m = seen[epoch]
        assert {"distractors_mAP", "distractors_rank1", "distractors_qe_mAP"} <= set(m)
        assert m["distractors_mAP"] <= m["mAP"] + 1e-9  # more wrong candidates never help
    with pytest.raises(ValueError, match="distractor_every"):
        _config(course_root, tmp_path, distractor_every=0)


# -- training learns --------------------------------------------------------------------------------------

CAMERA_COLOURS = [(230, 40, 40), (40, 200, 40), (40, 60, 230), (230, 220, 40), (200, 40, 200), (40, 200, 200)]


def make_background_dataset(root, n_ids=30, images_per_id=8, seed=0):
    """Course layout where the camera, not the person, dominates the pixels.

    Each camera paints a large background in its own colour; a person is three bands of random colours
    (their identity) at a jittered position. An untrained network ranks same-camera strangers first
    (mAP below chance); training must learn to ignore the camera colours, which it sees in training,
    and compare the bands of people it has never seen.
    """
    from PIL import Image

    from tests.synthetic import make_course_dataset
    from training.data.market import list_images, parse_course_name

    make_course_dataset(root, n_ids=n_ids, images_per_id=images_per_id, seed=3)  # names + annotations
    rng = np.random.default_rng(seed)
    bands = {}
    for path in list_images(root / "train"):
        pid, cam = parse_course_name(path)
        colours = bands.setdefault(pid, rng.integers(0, 256, (3, 3)))
        img = np.empty((64, 32, 3), np.float32)
        img[:] = CAMERA_COLOURS[cam - 1]
        top, left = rng.integers(2, 9), rng.integers(4, 13)
        for b in range(3):
            img[top + 16 * b : top + 16 * (b + 1), left : left + 16] = colours[b]
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_training_raises_validation_map(tmp_path, classifier):
    from training.engine import Trainer

    make_background_dataset(tmp_path / "data")
    torch.manual_seed(0)
    config = ReIDTrainConfig.from_recipe(
        "modern",
        data_root=str(tmp_path / "data"),
        cache_dir=None,
        backbone="osnet_x0_25",  # random init
        input_size=(64, 32),
        p=4,
        k=4,
        epochs=8,
        lr=2e-3,
        warmup_epochs=0,
        label_smoothing=0.0,
        erase_p=0.0,
        pad=2,
        patience=0,
        progress=False,
        classifier=classifier,
        amp=False,  # bf16 kernels differ between CPU generations; the threshold is set for fp32
    )
    data = load_reid_data(config, tmp_path / "run")
    task = ReIDTask(config, data)
    untrained = task.validate()["mAP"]
    result = Trainer(config, tmp_path / "run").fit(task)
    trained = result.best["mAP"]
    assert untrained < 0.2
    assert trained > untrained + 0.3, (untrained, [r["mAP"] for r in result.history])
