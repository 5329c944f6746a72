"""``reid-train evaluate-neighbours``: attributes averaged over re-ID neighbours, measured on the
distractor validation and recorded in the attribute bundle (``training.attribute_neighbours``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from training.cli.options import DataRoot, fail, require_data_root, user_errors

if TYPE_CHECKING:
    from app.bundle import Task

Opt = typer.Option
KEYS = ("mean_accuracy", "mA", "mA_two_class")


def evaluate_neighbours(
    bundle: Annotated[Path, typer.Argument(help="An attribute bundle trained on the split.")],
    reid_bundle: Annotated[Path, Opt(help="A re-ID bundle trained on the same split's identities.")],
    distractors: Annotated[
        Path, Opt(help="Unlabelled crops of other people (the course test/ folder) that lend neighbours.")
    ],
    split_file: Annotated[Path, Opt(help="The split both bundles were trained on.")],
    data_root: DataRoot = None,
    neighbours: Annotated[int, Opt(min=1, help="Nearest other crops averaged into each crop.")] = 20,
    alpha: Annotated[float, Opt(min=0.0, help="Neighbour weights are similarity**alpha.")] = 1.0,
    out: Annotated[Path | None, Opt(help="JSON report (default: BUNDLE/neighbours_metrics.json).")] = None,
    record: Annotated[
        bool, Opt("--record", help="Write the rule and its metrics into BUNDLE's manifest.")
    ] = False,
    record_into: Annotated[
        list[Path] | None,
        Opt(
            help="Also write the rule, without its taus, into this bundle: the same recipe trained on every "
            "identity, whose heads hold its own split run's decision rule (repeat)."
        ),
    ] = None,
    cache_dir: Annotated[Path | None, Opt(help="Decoded-image cache folder.")] = Path("cache"),
    threads: Annotated[int, Opt(help="CPU threads (0: one per core).")] = 0,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Measure attributes averaged over each crop's re-ID neighbours on the split's validation crops among
    the distractors: the bundle's own outputs against the averaged ones, each with per-group taus."""
    from app.bundle import NeighbourSmoothingSpec, read_manifest, write_manifest
    from training.attribute_neighbours import measure

    try:
        require_data_root(data_root)
        attr, reid = read_manifest(bundle), read_manifest(reid_bundle)
        _check_pair(bundle, attr, reid_bundle, reid)
        targets = [Path(p) for p in record_into or []]
        for target in targets:
            _check_target(target, attr)
        logits, embeddings, labels, identities, cameras, priors = _validation_outputs(
            bundle, reid_bundle, Path(data_root), split_file, distractors, cache_dir, threads, progress
        )
        result = measure(
            logits,
            embeddings,
            labels,
            identities,
            priors,
            neighbours,
            alpha,
            tracks=identities * 1000 + cameras,
        )
        result.update(bundle=f"{attr.name} {attr.version}", reid_bundle=f"{reid.name} {reid.version}")
        out = out or bundle / "neighbours_metrics.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        spec = NeighbourSmoothingSpec(
            neighbours=neighbours,
            alpha=alpha,
            min_similarity=result["min_similarity"],
            reid_bundle=f"{reid.name} {reid.version}",
            taus=result["smoothed"]["taus"],
            log_priors=priors,
            metrics={
                "protocol": f"{result['labelled']} validation crops among {result['crops']} (distractors)",
                "measured_on": f"{attr.name} {attr.version}",
                **{
                    f"{key}/{rule}": {k: result[key][rule][k] for k in KEYS}
                    for key in ("plain", "smoothed", "track")
                    for rule in ("as_is", "per_group", "per_group_two_fold")
                },
            },
        )
        # Another bundle of the recipe may have folded another per-group rule into its heads (the rule is
        # chosen on its own split run): it takes the averaging alone, whose gain was measured as_is.
        plain_rule = spec.model_copy(update={"taus": {}, "log_priors": {}})
        written = [(bundle, spec)] if record else []
        written += [(target, plain_rule) for target in targets]
        for target, rule in written:
            manifest = read_manifest(target)
            write_manifest(target, manifest.model_copy(update={"neighbour_smoothing": rule}))
    except user_errors() as exc:
        raise fail(str(exc)) from None
    typer.echo(
        f"{result['labelled']} validation crops among {result['crops']}, {neighbours} neighbours above "
        f"similarity {result['min_similarity']:.3f}; mean accuracy / mA / mA two-class"
    )
    for key in ("plain", "smoothed", "track"):
        for rule in ("as_is", "per_group", "per_group_two_fold"):
            row = result[key][rule]
            typer.echo(f"  {key:8s} {rule:18s} " + " / ".join(f"{row[k]:.4f}" for k in KEYS))
    typer.echo(f"  taus re-chosen for the averaged outputs: {result['smoothed']['taus']}")
    typer.echo(f"wrote {out}")
    for target, rule in written:
        taus = "with the re-chosen taus" if rule.taus else "without taus (the averaging alone)"
        typer.echo(f"recorded in {target / 'manifest.json'} {taus}")


def _check_pair(bundle: Path, attr: Any, reid_bundle: Path, reid: Any) -> None:
    """Both bundles must be of their task and must not have seen the validation identities."""
    if attr.task != "attributes":
        raise ValueError(f"{bundle} is a {attr.task} bundle, not an attribute bundle")
    if reid.task != "reid":
        raise ValueError(f"--reid-bundle {reid_bundle} is a {reid.task} bundle, not a re-ID bundle")
    for path, manifest in ((bundle, attr), (reid_bundle, reid)):
        if manifest.training_config.get("train_all"):
            raise ValueError(
                f"{path} was trained on every identity, so the validation identities were seen: measure "
                "the split run's bundle and pass this one to --record-into"
            )


def _check_target(target: Path, attr: Any) -> None:
    """A --record-into bundle: the same recipe (network) as the measured one."""
    from app.bundle import read_manifest
    from app.nets.attributes import AttributeNetConfig

    other = read_manifest(target)

    def network(manifest: Any) -> dict[str, object]:  # with the defaults older manifests leave out
        return AttributeNetConfig.from_dict(manifest.architecture).to_dict()

    if other.task != "attributes" or network(other) != network(attr):
        raise ValueError(f"--record-into {target}: not an attribute bundle of the measured bundle's network")


def _validation_outputs(
    bundle: Path,
    reid_bundle: Path,
    data_root: Path,
    split_file: Path,
    distractors: Path,
    cache_dir: Path | None,
    threads: int,
    progress: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, list[float]]]:
    """Attribute logits and re-ID embeddings of the validation crops then the distractors, the
    validation labels, identities and cameras, and the training images' log class priors."""
    import tempfile

    import torch

    from training.data.market import list_images, load_market
    from training.data.split import resolve_split
    from training.evaluation.attributes import log_priors
    from training.tasks.attributes import label_matrix

    if threads > 0:
        torch.set_num_threads(threads)
    if not split_file.is_file():
        raise ValueError(f"--split-file {split_file}: no such file (the split the bundles were trained on)")
    data = load_market(data_root, "auto")
    if data.attributes is None or not data.attributes:
        raise ValueError(f"{data_root}: no attribute annotations")
    labels = {pid: data.attributes[pid] for pid in data.train_ids}
    with tempfile.TemporaryDirectory() as scratch:
        split = resolve_split(
            labels, split_file=split_file, run_dir=scratch, data_fingerprint=data.fingerprint
        )
    train, val = split.partition(data.train)
    paths = [s.path for s in val] + list_images(distractors)
    logits = _run(bundle, "attributes", paths, cache_dir, progress)
    embeddings = _run(reid_bundle, "reid", paths, cache_dir, progress)
    priors = log_priors(label_matrix(train, data.attributes))
    return (
        logits,
        embeddings,
        label_matrix(val, data.attributes).numpy(),
        np.array([s.pid for s in val]),
        np.array([s.camid for s in val]),
        {name: value.tolist() for name, value in priors.items()},
    )


def _run(bundle: Path, task: Task, paths: list[Path], cache_dir: Path | None, progress: bool) -> Any:
    """A bundle's outputs for ``paths`` (its ONNX graph where it has one): logits per group as NumPy
    arrays, or the (N, D) embeddings."""
    import torch

    from training.batch_inference import open_for_prediction
    from training.data.cache import cached_images
    from training.data.transforms import to_model_input

    manifest, model = open_for_prediction(bundle, task)
    model.eval()
    images = cached_images(paths, tuple(manifest.input_size), cache_dir, progress=progress)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), 256):
            outputs.append(model(to_model_input(images[start : start + 256], "cpu", True)))
    if isinstance(outputs[0], dict):
        return {name: torch.cat([o[name] for o in outputs]).float().numpy() for name in outputs[0]}
    return torch.cat(outputs).float().numpy()
