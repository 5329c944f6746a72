"""Warm start: an attribute network takes its backbone from a re-ID bundle, and refuses a wrong one."""

from __future__ import annotations

import pytest
import torch

from app.bundle import BundleError
from app.nets.attributes import AttributeNet, AttributeNetConfig
from app.nets.reid import ReIDNet, ReIDNetConfig
from training.config import AttributeTrainConfig
from training.engine import BEST
from training.export import export_run
from training.tasks.attributes import build_attribute_net
from training.tasks.reid import ReIDTrainConfig


@pytest.fixture
def reid_bundle(tmp_path):
    """An exported re-ID bundle (OSNet x0.25, random weights, non-trivial BN statistics)."""
    torch.manual_seed(0)
    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), num_classes=5, branch_dim=16))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    config = ReIDTrainConfig.from_recipe("modern", backbone="osnet_x0_25", input_size=(64, 32), branch_dim=16)
    checkpoint = {"task": "reid", "epoch": 1, "model": net.state_dict(), "architecture": net.config.to_dict()}
    torch.save({**checkpoint, "metrics": {"mAP": 0.1}, "config": config.to_dict()}, tmp_path / BEST)
    return export_run(tmp_path, store=tmp_path / "store", name="reid"), net


def test_backbone_copied_from_the_avg_branch(reid_bundle):
    bundle, reid = reid_bundle
    config = AttributeTrainConfig(backbone="osnet_x0_25", input_size=(64, 32), init_weights=str(bundle))
    net = build_attribute_net(config).eval()
    reid.eval()
    x = torch.randint(0, 256, (2, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad():
        trunk = reid.trunk(reid.normalize(x))
        torch.testing.assert_close(net.trunk(net.normalize(x)), trunk)
        torch.testing.assert_close(net.last_stage(trunk), reid.branches["avg"].stage(trunk))
    fresh = AttributeNet(AttributeNetConfig("osnet_x0_25", (64, 32)))
    assert not torch.equal(fresh.trunk[0].conv.weight, net.trunk[0].conv.weight)


def test_stride_eight_attribute_net_keeps_the_warm_start_and_the_larger_map(reid_bundle):
    bundle, reid = reid_bundle
    config = AttributeTrainConfig(
        backbone="osnet_x0_25", input_size=(64, 32), init_weights=str(bundle), last_stride=1
    )
    net = build_attribute_net(config).eval()
    assert net.config.last_stride == 1
    torch.testing.assert_close(net.trunk[0].conv.weight, reid.trunk[0].conv.weight)
    x = torch.zeros(1, 3, 64, 32, dtype=torch.uint8)
    with torch.no_grad():
        ours = net.last_stage(net.trunk(net.normalize(x))).shape[-2:]
        theirs = reid.eval().branches["avg"].stage(reid.trunk(reid.normalize(x))).shape[-2:]
    assert tuple(ours) == tuple(2 * s for s in theirs)
    with pytest.raises(ValueError, match="last_stride must be 1 or 2"):
        AttributeTrainConfig(backbone="osnet_x0_25", last_stride=4)


def test_wrong_backbone_or_task_refused(reid_bundle, tmp_path):
    bundle, _ = reid_bundle
    config = AttributeTrainConfig(backbone="mobilenet_v2", input_size=(64, 32), init_weights=str(bundle))
    with pytest.raises(BundleError, match="--backbone osnet_x0_25"):
        build_attribute_net(config)
    torch.save(
        {
            "task": "attributes",
            "epoch": 1,
            "model": AttributeNet(AttributeNetConfig("osnet_x0_25", (64, 32))).state_dict(),
            "architecture": AttributeNetConfig("osnet_x0_25", (64, 32)).to_dict(),
            "metrics": {},
            "config": AttributeTrainConfig(backbone="osnet_x0_25", input_size=(64, 32)).to_dict(),
        },
        tmp_path / BEST,
    )
    attributes = export_run(tmp_path, store=tmp_path / "store", name="attributes")
    config = AttributeTrainConfig(backbone="osnet_x0_25", input_size=(64, 32), init_weights=str(attributes))
    with pytest.raises(BundleError, match="needs a re-ID bundle"):
        build_attribute_net(config)
