"""The training loop both tasks share: the Trainer owns the loop, a Task owns the model, data and losses.

Task contract (a structural protocol; see ``training/tasks/attributes.py`` for a complete example)::

    class Task(Protocol):
        name: str                      # 'attributes' | 'reid'; stored in checkpoints, export dispatches on it
        model: nn.Module               # built on CPU; the Trainer moves it to the device

        def parameter_groups(self) -> list[dict]      # optional; Adam param groups. A group may carry
                                                      # 'lr_scale' (its lr = config.lr * lr_scale).
                                                      # Default: all of model.parameters().
        def train_batches(self, epoch: int) -> Iterable[Batch]
                                                      # one epoch of batches (1-based epoch). Shuffle with a
                                                      # generator seeded from (config.seed, epoch), not the
                                                      # global one, so a resumed epoch sees the same order.
        def train_step(self, batch: Batch) -> dict[str, Tensor]
                                                      # move the batch to trainer.device, augment, forward,
                                                      # return losses: 'loss' is back-propagated, every
                                                      # entry is averaged into 'train_<key>' of the epoch.
                                                      # Runs in train mode under autocast.
        def validate(self) -> dict[str, float]        # full validation pass; must contain config.monitor
                                                      # (e.g. 'val_loss'). Runs in eval mode, under
                                                      # torch.no_grad() and autocast.
        def state_dict(self) -> dict                  # optional: task extras to checkpoint (e.g. a sampler)
        def load_state_dict(self, state: dict) -> None  # optional: restore them on --resume

    A batch's image count (for images/s) is ``len(batch[0])`` for a tuple/list batch, ``len(batch)``
    for a tensor, or ``batch['images']`` for a dict. When ``train_batches`` returns something with a
    ``len()`` (e.g. :class:`Batches`), the progress bar shows the epoch's total.

The Trainer handles: device selection (``auto`` = CUDA when available), mixed precision on CUDA,
channels-last memory format (``trainer.channels_last``; tasks pass it to their augmentation),
``config.threads`` CPU threads, Adam with ``config.lr`` / ``config.weight_decay``, an optional linear
warm-up and step decay (per epoch), gradient clipping, an optional moving average of the weights
(``config.ema_decay``: validated, kept as the best epoch and exported in place of the raw weights; see
``training/ema.py``), early stopping on ``config.monitor`` (``min`` or
``max``, ``patience`` epochs; 0 disables), and the run directory:

- ``config.json``: the resolved config, written before the first epoch;
- ``metrics.json``: one record per epoch (lr, train losses, validation metrics, seconds, images/s);
- ``last.pt``: everything needed to continue exactly (model, optimizer, scheduler, grad scaler, RNG states,
  epoch, best value, patience counter, history, task extras), written after every epoch;
- ``best.pt``: the best epoch's weights with its metrics, the task name, the network's architecture
  (``model.config.to_dict()``) and the run config; ``training/export.py`` turns it into a bundle.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.config import MONITOR_LAST, TrainConfig
from training.ema import WeightAverage

CONFIG_FILE = "config.json"
COMMANDS_FILE = "commands.txt"  # one line per start or resume: the command line that ran
METRICS_FILE = "metrics.json"
LAST = "last.pt"
BEST = "best.pt"


@runtime_checkable
class Task(Protocol):
    name: str
    model: nn.Module

    def train_batches(self, epoch: int) -> Iterable[Any]: ...

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]: ...

    def validate(self) -> dict[str, float]: ...


class Batches:
    """An iterable of batches with a known count, so the progress bar can show the epoch's total."""

    def __init__(self, batches: Iterable[Any], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


class RunExistsError(RuntimeError):
    """The run directory already holds a run and ``resume`` was not asked for."""


@dataclass
class FitResult:
    """How a run ended."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_value: float | None
    stopped_early: bool = False
    run_dir: Path = field(default_factory=Path)

    @property
    def best(self) -> dict[str, Any]:
        return next((r for r in self.history if r["epoch"] == self.best_epoch), {})


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_precision(amp: bool, device: torch.device) -> str:
    """fp16 autocast on CUDA, bf16 on a CPU with native bf16, fp32 otherwise or without ``amp``.

    bf16 autocast trains the two-branch OSNet 1.1-1.8x faster than fp32 on this project's 2-core CPU,
    with the same accuracy on a full run (docs/models.md, "bf16 training").
    """
    if not amp:
        return "fp32"
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of unmapping it (Linux only; a no-op elsewhere).

    A CPU training step allocates and frees activation buffers of tens of MB; by default glibc serves
    each from a fresh mmap, so every step pays page faults again. On 2 cores this measured 3x the system
    time and about half the training speed for MobileNetV2 at 256x128, batch 128. Call it once at start.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a ``best.pt`` / ``last.pt`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=False)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return len(batch["images"])
    return len(batch[0])


def _architecture(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return config.to_dict() if config is not None and hasattr(config, "to_dict") else {}


class LrSchedule:
    """Per-epoch lr factor: linear warm-up over ``warmup_epochs``, then x ``gamma`` at each step."""

    def __init__(self, warmup_epochs: int, warmup_factor: float, steps: Iterable[int], gamma: float):
        self.warmup_epochs, self.warmup_factor = warmup_epochs, warmup_factor
        self.steps, self.gamma = sorted(steps), gamma

    def __call__(self, index: int) -> float:
        """``index`` is the 0-based epoch (LambdaLR's counter)."""
        epoch = index + 1
        factor = self.gamma ** sum(epoch > s for s in self.steps)
        if epoch <= self.warmup_epochs:
            alpha = (epoch - 1) / max(self.warmup_epochs, 1)
            factor *= self.warmup_factor + (1 - self.warmup_factor) * alpha
        return factor


def record_command(run_dir: Path) -> None:
    """Append this process's command line to the run's commands.txt (bundles record it)."""
    line = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    with (run_dir / COMMANDS_FILE).open("a") as fh:
        fh.write(line + "\n")


class Trainer:
    """Runs a Task for ``config.epochs`` epochs into ``run_dir``; see the module docstring."""

    def __init__(self, config: TrainConfig, run_dir: str | Path | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir or config.run_dir or "runs/default")
        self.device = resolve_device(config.device)
        self.precision = resolve_precision(config.amp, self.device)
        self.amp = self.precision != "fp32"
        config.precision = self.precision  # the saved config says what the run trained in
        # Channels-last on every device: on CUDA for the tensor cores, and on 2 CPU cores it measured
        # 1.2-1.5x faster for MobileNetV2 training at 128x64 (docs/training.md).
        self.channels_last = True
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.autocast_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16

    # -- the pieces a task may use ---------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.amp)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, task: Task, *, resume: bool = False) -> FitResult:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last_path = self.run_dir / LAST
        if last_path.exists() and not resume:
            raise RunExistsError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, "
                "or choose another --run-dir"
            )
        if resume and not last_path.exists():
            raise FileNotFoundError(f"{last_path}: nothing to resume")

        seed_everything(cfg.seed)
        model = task.model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = self._optimizer(task)
        schedule = LrSchedule(cfg.warmup_epochs, cfg.warmup_factor, cfg.lr_steps, cfg.lr_gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # bf16 keeps fp32's exponent range: no loss scaling (the scaler is kept, disabled, for resume).
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        sign = 1.0 if cfg.monitor_mode == "max" else -1.0
        ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None

        start, best_value, best_epoch, bad_epochs, stopped = 1, None, 0, 0, False
        history: list[dict[str, Any]] = []
        if resume:
            ckpt = load_checkpoint(last_path)
            if ckpt.get("task") != task.name:
                raise ValueError(f"{last_path}: a {ckpt.get('task')!r} run, not {task.name!r}")
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            if ema is not None:
                if ckpt.get("ema") is None:
                    raise ValueError(f"{last_path}: no weight average kept (started without ema_decay)")
                ema.load_state_dict(ckpt["ema"])
            if hasattr(task, "load_state_dict") and ckpt.get("task_state") is not None:
                task.load_state_dict(ckpt["task_state"])
            start = ckpt["epoch"] + 1
            best_value, best_epoch = ckpt["best_value"], ckpt["best_epoch"]
            bad_epochs, stopped, history = ckpt["bad_epochs"], ckpt["stopped"], ckpt["history"]
            set_rng_state(ckpt["rng"])
        cfg.save(self.run_dir / CONFIG_FILE)
        record_command(self.run_dir)

        for epoch in range(start, cfg.epochs + 1):
            if stopped:
                break
            started = time.perf_counter()
            model.train()
            train_stats, images_per_s = self._train_epoch(task, optimizer, scaler, epoch, ema)
            with ema.applied(model) if ema is not None else nullcontext():
                model.eval()
                with torch.no_grad(), self.autocast():
                    val = {k: float(v) for k, v in task.validate().items()}
                model.train()
            if cfg.monitor != MONITOR_LAST and cfg.monitor not in val:
                raise KeyError(f"validate() returned no {cfg.monitor!r} (got {', '.join(sorted(val))})")
            record = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                **train_stats,
                **val,
                "seconds": round(time.perf_counter() - started, 2),
                "images_per_s": round(images_per_s, 1),
            }
            history.append(record)
            value = float(epoch) if cfg.monitor == MONITOR_LAST else val[cfg.monitor]
            if best_value is None or sign * (value - best_value) > 0:
                best_value, best_epoch, bad_epochs = value, epoch, 0
                weights = ema.state if ema is not None else model.state_dict()  # what was validated
                _save_atomic(
                    {
                        "task": task.name,
                        "epoch": epoch,
                        "model": {k: v.detach().cpu() for k, v in weights.items()},
                        "architecture": _architecture(model),
                        "metrics": record,
                        "config": cfg.to_dict(),
                    },
                    self.run_dir / BEST,
                )
            else:
                bad_epochs += 1
            stopped = bool(cfg.patience and bad_epochs >= cfg.patience)
            scheduler.step()
            _save_atomic(
                {
                    "task": task.name,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng_state(),
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped": stopped,
                    "history": history,
                    "task_state": task.state_dict() if hasattr(task, "state_dict") else None,
                    "ema": ema.state_dict() if ema is not None else None,
                },
                last_path,
            )
            (self.run_dir / METRICS_FILE).write_text(json.dumps(history, indent=1) + "\n")
            tqdm.write(self._summary(record, best_epoch == epoch))
            if stopped:
                tqdm.write(f"early stop: no {cfg.monitor} improvement for {cfg.patience} epochs")
        return FitResult(history, best_epoch, best_value, stopped, self.run_dir)

    def _optimizer(self, task: Task) -> torch.optim.Optimizer:
        cfg = self.config
        if hasattr(task, "parameter_groups"):
            groups = []
            for group in task.parameter_groups():
                group = dict(group)
                group["lr"] = cfg.lr * group.pop("lr_scale", 1.0)
                groups.append(group)
        else:
            groups = [{"params": [p for p in task.model.parameters() if p.requires_grad]}]
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def _train_epoch(
        self,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        epoch: int,
        ema: WeightAverage | None = None,
    ) -> tuple[dict[str, float], float]:
        cfg = self.config
        sums: dict[str, float] = {}
        steps, images, elapsed = 0, 0, 0.0
        batches = task.train_batches(epoch)
        bar = tqdm(
            batches, total=len(batches) if hasattr(batches, "__len__") else None,
            desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
            disable=not cfg.progress, leave=False, dynamic_ncols=True,
        )  # fmt: skip
        tick = time.perf_counter()
        for batch in bar:
            n = _batch_len(batch)
            with self.autocast():
                losses = task.train_step(batch)
            loss = losses["loss"]
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"epoch {epoch}, step {steps + 1}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(task.model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(task.model)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            steps += 1
            images += n
            now = time.perf_counter()
            elapsed, tick = elapsed + (now - tick), now
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
        bar.close()
        if steps == 0:
            raise RuntimeError(f"epoch {epoch}: the task produced no training batches")
        return {f"train_{k}": v / steps for k, v in sums.items()}, images / max(elapsed, 1e-9)

    def _summary(self, record: dict[str, Any], best: bool) -> str:
        shown = ["train_loss", self.config.monitor, "mean_accuracy", "mA", "mAP", "rank1", "distractors_mAP"]
        parts = [f"epoch {record['epoch']}"]
        parts += [f"{k} {record[k]:.4f}" for k in dict.fromkeys(shown) if isinstance(record.get(k), float)]
        parts += [f"{record['seconds']:.0f}s", f"{record['images_per_s']:.0f} img/s"]
        return " | ".join(parts) + (" *" if best else "")
