"""Options, parsers and error handling shared by the ``reid-train`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

# Every data option reads --data-root or REID_DATA_ROOT; nothing points at a fixed location.
DataRoot = Annotated[
    Path | None,
    typer.Option(
        "--data-root", envvar="REID_DATA_ROOT", help="Market-1501 folder (course or original layout)."
    ),
]
Layout = Annotated[str, typer.Option(help="auto | course | original")]


def fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(1)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that are the user's to fix: printed as one line, no traceback."""
    from app.bundle import BundleError
    from app.nets.backbones import WeightsUnavailableError
    from app.preprocess import ImageError
    from training.data.market import DataError
    from training.engine import RunExistsError
    from training.export import ExportError
    from training.onnx_export import OnnxExportError

    return (
        BundleError, WeightsUnavailableError, ImageError, DataError, RunExistsError, ExportError,
        OnnxExportError, FileNotFoundError, KeyError, ValueError,
    )  # fmt: skip


def parse_size(text: str) -> tuple[int, int]:
    """``256x128`` -> (256, 128): height x width."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise typer.BadParameter(f"expected HEIGHTxWIDTH such as 256x128, got {text!r}") from None
    return height, width


def parse_steps(text: str) -> tuple[int, ...]:
    """'8,12' -> (8, 12); empty text -> ()."""
    try:
        steps = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected epochs separated by commas such as 8,12, got {text!r}") from None
    if any(step < 1 for step in steps):
        raise typer.BadParameter(f"epochs must be at least 1, got {text!r}")
    return steps


def require_data_root(data_root: Path | None) -> Path:
    if data_root is None:
        raise fail("no data root: pass --data-root or set REID_DATA_ROOT")
    return data_root


def resolve_init_weights(value: str | None, *, bundles: bool = False) -> str | None:
    """None, 'imagenet', or the absolute path of a state-dict file (or, with ``bundles``, a bundle)."""
    if value is None or value.lower() == "none":
        return None
    if value.lower() == "imagenet":
        return "imagenet"
    from training.warm_start import is_bundle_dir

    path = Path(value)
    if bundles and is_bundle_dir(path):
        return str(path.resolve())
    if not path.is_file():
        kinds = "a state-dict file, a re-ID bundle folder" if bundles else "a state-dict file"
        raise fail(f"--init-weights {value}: no such file (pass {kinds}, 'imagenet' or 'none')")
    return str(path.resolve())


def prepare_config(config_cls: type, options: dict[str, Any], run_dir: Path | None, resume: bool) -> Any:
    """A new config from the given options, or the saved one of ``run_dir`` with allowed overrides.

    ``options`` holds only what the user passed (None = not given). On ``--resume`` the run continues
    with its saved config; only the options that do not change what is trained may be given again.
    """
    from training.engine import CONFIG_FILE

    given = {k: v for k, v in options.items() if v is not None}
    if not resume:
        return config_cls(**given, run_dir=str(run_dir) if run_dir else "")
    if run_dir is None:
        raise fail("--resume needs --run-dir (the run to continue)")
    saved = config_cls.load(run_dir / CONFIG_FILE)
    changeable = {
        "epochs",
        "patience",
        "device",
        "workers",
        "threads",
        "data_root",
        "cache_dir",
        "progress",
        "amp",
    }
    refused = sorted(set(given) - changeable)
    if refused:
        raise fail(f"--resume continues the saved config; these options cannot change: {', '.join(refused)}")
    return saved.replace(run_dir=str(run_dir), **given)
