"""Backbone registry: name -> constructor that returns a trunk and a separable last stage.

The last stage is kept apart so the re-ID network can duplicate it into two branches (the report's
design) while the attribute network simply runs trunk then last stage. Where each split is:

- ``resnet50``: trunk = conv1 .. layer3, last stage = layer4 (2048 channels).
- ``mobilenet_v2``: trunk = features[0:14] (stride 16, 96 channels), last stage = features[14:]
  (the 160- and 320-channel inverted residuals and the 1x1 conv to 1280 channels).
- ``osnet_x0_25``: trunk = conv1 .. conv3, last stage = conv4 + conv5 (128 channels). OSNet's last
  stage has no stride of its own: ``last_stride`` 1 drops the average pooling of conv3's transition
  instead, so the last stage runs at stride 8 (the same effect: a final map twice as tall and wide).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from app.nets.osnet import OSNetFeatures

IMAGENET = "imagenet"


@dataclass
class BackboneParts:
    """A backbone split into the shared trunk and the stage the re-ID net duplicates."""

    trunk: nn.Module
    last_stage: nn.Module
    channels: int


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline and no local file)."""


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"init weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # Checkpoints saved from DataParallel prefix every key with 'module.'.
    return {k.removeprefix("module."): v for k, v in state.items()}


def _torchvision_weights(builder: Callable[..., nn.Module], enum_name: str) -> nn.Module:
    import torchvision.models as tvm

    weights = getattr(tvm, enum_name).IMAGENET1K_V1
    try:
        return builder(weights=weights)
    except Exception as exc:  # the hub download fails in many ways when offline
        raise WeightsUnavailableError(
            f"could not download torchvision's ImageNet weights ({type(exc).__name__}: {exc}). "
            "Pass a local state-dict file instead, e.g. "
            "--init-weights ../shared/weights/mobilenet_v2_imagenet_features.pth, "
            "or no init weights to start from random."
        ) from exc


def _resnet50(init_weights: str | None, last_stride: int) -> BackboneParts:
    import torchvision.models as tvm

    if init_weights == IMAGENET:
        net = _torchvision_weights(tvm.resnet50, "ResNet50_Weights")
    else:
        net = tvm.resnet50()
        if init_weights:
            state = _read_state_dict(init_weights)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            net.load_state_dict(state, strict=False)
    if last_stride == 1:
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    return BackboneParts(trunk, net.layer4, 2048)


def _mobilenet_v2(init_weights: str | None, last_stride: int) -> BackboneParts:
    import torchvision.models as tvm

    if init_weights == IMAGENET:
        features = _torchvision_weights(tvm.mobilenet_v2, "MobileNet_V2_Weights").features
    else:
        features = tvm.mobilenet_v2().features
        if init_weights:
            state = _read_state_dict(init_weights)
            if any(k.startswith("features.") for k in state):
                state = {
                    k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
                }
            features.load_state_dict(state, strict=True)
    if last_stride == 1:
        features[14].conv[1][0].stride = (1, 1)  # the depthwise conv of the stride-2 block
    return BackboneParts(features[:14], features[14:], 1280)


def _osnet_x0_25(init_weights: str | None, last_stride: int) -> BackboneParts:
    net = OSNetFeatures((16, 64, 96, 128))
    if init_weights == IMAGENET:
        raise WeightsUnavailableError(
            "osnet_x0_25 has no torchvision ImageNet weights; pass a torchreid checkpoint file, "
            "e.g. --init-weights ../shared/weights/osnet_x0_25_msmt17.pth"
        )
    if init_weights:
        state = _read_state_dict(init_weights)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
        net.load_state_dict(state, strict=True)
    if last_stride == 1:
        net.conv3[-1][1] = nn.Identity()  # the transition's AvgPool2d(2); it has no weights to load
    trunk = nn.Sequential(net.conv1, net.maxpool, net.conv2, net.conv3)
    return BackboneParts(trunk, nn.Sequential(net.conv4, net.conv5), net.out_channels)


BACKBONES: dict[str, Callable[[str | None, int], BackboneParts]] = {
    "resnet50": _resnet50,
    "mobilenet_v2": _mobilenet_v2,
    "osnet_x0_25": _osnet_x0_25,
}


def build_backbone(name: str, *, init_weights: str | None = None, last_stride: int = 2) -> BackboneParts:
    """Build a registered backbone; ``init_weights`` is None, 'imagenet' or a state-dict path."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(sorted(BACKBONES))}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    return BACKBONES[name](init_weights, last_stride)
