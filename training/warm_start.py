"""Start an attribute network from a trained re-ID bundle's backbone.

Measured on the committed split (docs/models.md, ``benchmarks/attribute_probe.py``): a linear probe on
the frozen embedding of the 128x64 re-ID bundle (``models_store/reid-128x64``) predicts the 12 attribute
groups better (mean accuracy 0.823) than a probe on ImageNet MobileNetV2 features (0.756) or on the
MSMT17 OSNet (0.786). Identity features already encode clothing,
carried objects and gender, so an attribute run fine-tunes from them.

The re-ID network (``app.nets.reid.ReIDNet``) and the attribute network share the backbone's trunk
module by module; the attribute network's last stage is taken from the re-ID network's average-pooling
branch. Keys map as ``trunk.* -> trunk.*`` and ``branches.avg.stage.* -> last_stage.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.bundle import MANIFEST, BundleError
from app.nets.attributes import AttributeNet
from app.nets.bundles import load_bundle

_PREFIXES = {"trunk.": "trunk.", "branches.avg.stage.": "last_stage."}


def is_bundle_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a bundle directory (it holds a manifest)."""
    return path is not None and (Path(path) / MANIFEST).is_file()


def backbone_state_from_reid(reid_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attribute network's trunk and last-stage weights taken from a re-ID state dict."""
    state = {}
    for key, value in reid_state.items():
        for source, target in _PREFIXES.items():
            if key.startswith(source):
                state[target + key.removeprefix(source)] = value
    return state


def warm_start_from_reid(net: AttributeNet, bundle: str | Path) -> int:
    """Load a re-ID bundle's backbone into ``net`` (heads stay as initialised); returns tensors loaded.

    The bundle must be a re-ID bundle of the same backbone; a different input size is allowed (the
    backbone is fully convolutional) but is the caller's choice to make.
    """
    manifest, reid = load_bundle(bundle)
    if manifest.task != "reid":
        raise BundleError(f"{bundle}: warm start needs a re-ID bundle, this one is {manifest.task!r}")
    if manifest.backbone != net.config.backbone:
        raise BundleError(
            f"{bundle}: its backbone is {manifest.backbone!r}, the attribute network's is "
            f"{net.config.backbone!r}; pass --backbone {manifest.backbone}"
        )
    state = backbone_state_from_reid(reid.state_dict())
    own = {k for k in net.state_dict() if k.startswith(tuple(_PREFIXES.values()))}
    if set(state) != own:
        missing, extra = sorted(own - set(state)), sorted(set(state) - own)
        raise BundleError(f"{bundle}: backbone keys do not match (missing {missing[:3]}, extra {extra[:3]})")
    net.load_state_dict(state, strict=False)
    return len(state)
