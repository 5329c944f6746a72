"""Two-branch re-ID network: output shapes in train and eval mode for each backbone."""

from __future__ import annotations

import pytest
import torch

from app.nets.reid import ReIDNet, ReIDNetConfig, ReIDTrainOutput

CHANNELS = {"mobilenet_v2": 1280, "osnet_x0_25": 128, "resnet50": 2048}


@pytest.mark.parametrize(
    ("backbone", "branch_dim"), [("mobilenet_v2", None), ("osnet_x0_25", None), ("resnet50", 64)]
)
def test_shapes_train_and_eval(backbone, branch_dim):
    torch.manual_seed(0)
    net = ReIDNet(ReIDNetConfig(backbone, (64, 32), num_classes=5, branch_dim=branch_dim))
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    dim = branch_dim or CHANNELS[backbone]
    out = net.train()(x)
    assert isinstance(out, ReIDTrainOutput)
    assert set(out.features) == set(out.logits) == {"avg", "max"}
    assert all(f.shape == (3, dim) for f in out.features.values())
    assert all(lg.shape == (3, 5) for lg in out.logits.values())
    with torch.no_grad():
        emb = net.eval()(x)
    assert emb.shape == (3, 2 * dim) == (3, net.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_branches_do_not_share_last_stage():
    net = ReIDNet(ReIDNetConfig("mobilenet_v2", (64, 32), num_classes=3))
    avg, mx = net.branches["avg"].stage, net.branches["max"].stage
    assert all(a.data_ptr() != m.data_ptr() for a, m in zip(avg.parameters(), mx.parameters(), strict=True))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "osnet_x0_25", "resnet50"])
def test_last_stride_one_doubles_the_final_map(backbone):
    def final_map(stride):
        net = ReIDNet(ReIDNetConfig(backbone, (64, 32), last_stride=stride)).eval()
        with torch.no_grad():
            return net.branches["avg"].stage(net.trunk(torch.zeros(1, 3, 64, 32))).shape[-2:]

    assert tuple(final_map(1)) == tuple(2 * s for s in final_map(2))


def test_generalised_mean_pooling_spans_average_to_max_pooling():
    from app.nets.reid import GeneralizedMeanPool

    x = torch.rand(2, 4, 8, 4)
    pooled = {p: GeneralizedMeanPool(p)(x).flatten(1) for p in (1.0, 3.0, 60.0)}
    torch.testing.assert_close(pooled[1.0], x.mean(dim=(2, 3)))
    assert torch.all(pooled[1.0] < pooled[3.0]) and torch.all(pooled[3.0] < pooled[60.0])
    torch.testing.assert_close(pooled[60.0], x.amax(dim=(2, 3)), atol=0.1, rtol=0)


def test_gem_exponent_is_trained_in_the_avg_branch_only():
    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), num_classes=3, gem_p=3.0)).train()
    out = net(torch.randint(0, 256, (4, 3, 64, 32), dtype=torch.uint8))
    (out.features["avg"].sum() + out.logits["avg"].sum()).backward()
    p = net.branches["avg"].pool.p
    assert p.grad is not None and float(p.grad) != 0.0
    assert not any(name.endswith("pool.p") for name, _ in net.branches["max"].named_parameters())
    with pytest.raises(ValueError, match="gem_p must be positive"):
        ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), gem_p=0.0))


def test_stripes_are_parts_of_the_avg_branch_map_trained_by_identity():
    torch.manual_seed(0)
    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), num_classes=5, branch_dim=16, stripes=2))
    x = torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)
    out = net.train()(x)
    assert set(out.features) == {"avg", "max"}  # the triplet loss sees the global branches only
    assert set(out.logits) == {"avg", "max", "stripe0", "stripe1"}
    out.logits["stripe1"].sum().backward()  # a part's identity loss trains the avg branch's stage
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.branches["avg"].stage.parameters())
    assert all(p.grad is None for p in net.branches["max"].stage.parameters())
    net.eval()
    with torch.no_grad():
        emb = net(x)
        shared = net.trunk(net.normalize(x))
        necks = [net.branches[b].head(net.branches[b].stage(shared))[1] for b in ("avg", "max")]
        halves = net.branches["avg"].stage(shared).chunk(2, dim=2)  # the upper and lower stripe
        necks += [net.stripes[f"stripe{i}"].neck(half.mean((2, 3))) for i, half in enumerate(halves)]
    assert emb.shape == (3, 2 * 16 + 2 * CHANNELS["osnet_x0_25"]) == (3, net.embedding_dim)
    torch.testing.assert_close(emb, torch.nn.functional.normalize(torch.cat(necks, 1), dim=1))
    with pytest.raises(ValueError, match="stripes must be >= 0"):
        ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), stripes=-1))


def test_inference_net_has_no_classifier():
    net = ReIDNet(ReIDNetConfig("osnet_x0_25", (64, 32), num_classes=0))
    assert not any("classifier" in k for k in net.state_dict())
    assert net.train()(torch.zeros(2, 3, 64, 32)).logits == {}
