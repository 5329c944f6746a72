"""Typed run configurations: one dataclass per task, serialisable to and from JSON.

Every run saves its resolved config (``config.json``) beside its outputs, and ``--resume`` reads it back,
so a run can always be repeated or continued from its directory alone. Common fields live in
:class:`TrainConfig`; a task adds its own fields in a subclass and names itself in ``TASK`` (the re-ID
task defines its subclass next to its task code).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

C = TypeVar("C", bound="TrainConfig")


# ``monitor`` value that keeps the last epoch (a schedule run to its end, as --train-all runs are).
MONITOR_LAST = "epoch"


@dataclass
class TrainConfig:
    """Fields every training run has. Defaults are the report's (Adam, lr 1e-4, wd 5e-4, batch 128)."""

    TASK: ClassVar[str] = ""

    # Data
    data_root: str = ""
    layout: str = "auto"  # auto | course | original; resolved before the config is saved
    data_fingerprint: str = ""  # filled in when the data is read; --resume refuses other data
    split_file: str | None = None  # reused when it exists, written there otherwise
    val_fraction: float = 0.2
    limit_ids: int | None = None  # keep this many training identities (quick runs)
    cache_dir: str = "cache"
    workers: int = 2  # threads for decoding images into the cache

    # Model
    backbone: str = "mobilenet_v2"
    init_weights: str | None = None  # None, 'imagenet', a state-dict file or (attributes) a re-ID bundle
    input_size: tuple[int, int] = (256, 128)  # (height, width)

    # Optimisation
    epochs: int = 100
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 0  # linear warm-up from warmup_factor * lr
    warmup_factor: float = 0.1
    lr_steps: tuple[int, ...] = ()  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    grad_clip: float | None = None
    # Moving average of the weights (training/ema.py): 0 off; e.g. 0.999 averages ~1,000 steps.
    ema_decay: float = 0.0

    # Early stopping and checkpoints
    monitor: str = "val_loss"  # a validation value, or "epoch": keep the last epoch, never stop early
    monitor_mode: str = "min"  # min | max
    patience: int = 5  # epochs without improvement before stopping; 0 disables early stopping

    # Augmentation (batched, see training/data/transforms.py)
    flip: bool = True
    pad: int = 10
    erase_p: float = 0.5

    # Runtime
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (one per core)
    amp: bool = True  # mixed precision: fp16 on CUDA, bf16 on a CPU with native bf16
    precision: str = ""  # what the run trains in (fp16 | bf16 | fp32), filled in by the Trainer
    seed: int = 0
    run_dir: str = ""
    progress: bool = True

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]
        self.lr_steps = tuple(int(v) for v in self.lr_steps)
        if len(self.input_size) != 2 or min(self.input_size) < 8:
            raise ValueError(f"input_size must be (height, width) of at least 8, got {self.input_size}")
        if not 0.0 <= self.erase_p <= 1.0:
            raise ValueError(f"erase_p must be in [0, 1], got {self.erase_p}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {self.monitor_mode!r}")
        if self.monitor == MONITOR_LAST:  # the epoch number only grows: the last epoch is the best
            self.monitor_mode, self.patience = "max", 0
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.layout not in ("auto", "course", "original"):
            raise ValueError(f"layout must be auto, course or original, got {self.layout!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return {"task": self.TASK, **data}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        task = data.pop("task", cls.TASK)
        if task != cls.TASK:
            raise ValueError(f"config is for task {task!r}, expected {cls.TASK!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys for {cls.__name__}: {', '.join(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


@dataclass
class AttributeTrainConfig(TrainConfig):
    """The attribute classifier: 12 heads, class-weighted cross-entropy summed over heads."""

    TASK: ClassVar[str] = "attributes"

    dropout: float = 0.2
    last_stride: int = 2
    stripes: int = 0  # horizontal stripes pooled beside the global average for the heads (AttributeNet)
    max_pool: bool = False  # the global max pooled beside the average for the heads (AttributeNet)
    label_smoothing: float = 0.0  # of the heads' training cross-entropy (labels are per identity)
    class_weights: str = "majority"  # majority (majority count / class count) | sqrt (its root) | none
    # APR (Lin et al. 2019): an identity classifier on the pooled features, trained with the heads and
    # dropped at export; its label-smoothed cross-entropy is added with this weight (0 = off).
    id_loss_weight: float = 0.0
    # Train on every identity, the split's validation ones too (for a shipped bundle): per-epoch
    # validation is skipped, the last epoch is kept, and export takes the decision rule and metrics
    # of the same recipe's split run (``--metrics-from``).
    train_all: bool = False
    epochs: int = 100
    patience: int = 5
    monitor: str = "val_loss"
    monitor_mode: str = "min"

    def __post_init__(self) -> None:
        if self.train_all:  # nothing unseen to choose an epoch on: keep the last one (TrainConfig's rule)
            self.monitor = MONITOR_LAST
        super().__post_init__()
        if self.class_weights not in ("majority", "sqrt", "none"):
            raise ValueError(f"class_weights must be majority, sqrt or none, got {self.class_weights!r}")
        if self.id_loss_weight < 0:
            raise ValueError(f"id_loss_weight must be >= 0, got {self.id_loss_weight}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.stripes < 0:
            raise ValueError(f"stripes must be >= 0, got {self.stripes}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def read_task(path: str | Path) -> str:
    """The task named in a saved config (``attributes``, ``reid``) without building the config."""
    return str(json.loads(Path(path).read_text()).get("task", ""))
