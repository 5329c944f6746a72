"""The re-ID evaluation command of ``reid-train``: evaluate-reid, and recording its metrics in a bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from training.cli.options import DataRoot, fail, user_errors

Opt = typer.Option


def print_metrics(val: dict[str, Any]) -> None:
    """A validation result, one line per variant; train-reid prints it too."""
    typer.echo(
        f"rank-1 {val['rank1']:.4f}, rank-5 {val['rank5']:.4f}, rank-10 {val['rank10']:.4f}, "
        f"mAP {val['mAP']:.4f}, mINP {val['mINP']:.4f}, course mAP@80 {val['map80']:.4f}; "
        f"match threshold {val['match_threshold']:.4f} (cosine, 1% false matches)"
    )
    if "query_expansion" in val:
        qe = val["query_expansion"]
        typer.echo(
            f"query expansion ({qe['neighbours']} neighbours): rank-1 {qe['rank1']:.4f}, "
            f"mAP {qe['mAP']:.4f}, "
            f"mINP {qe['mINP']:.4f}; match threshold {qe['match_threshold']:.4f}"
        )
        if "gallery_side" in qe:
            gs = qe["gallery_side"]
            typer.echo(
                f"  + gallery-side augmentation ({gs.get('order', 'expand_first')}) of the top "
                f"{gs['shortlist']} ({gs['neighbours']} neighbours, weight {gs['weight']:g}): "
                f"rank-1 {gs['rank1']:.4f}, mAP {gs['mAP']:.4f}, mINP {gs['mINP']:.4f}; "
                f"match threshold {gs['match_threshold']:.4f}"
            )
    if "unlabelled_threshold" in val:
        est = val["unlabelled_threshold"]
        typer.echo(
            f"match threshold estimated on the {est['crops']} distractor crops alone: "
            f"{est['match_threshold']:.4f}, with query expansion {est['match_threshold_expanded']:.4f}"
            + (
                f", and gallery-side rescoring {est['match_threshold_gallery_side']:.4f}"
                if "match_threshold_gallery_side" in est
                else ""
            )
        )
    if "track_queries" in val:
        tr = val["track_queries"]
        typer.echo(
            f"track queries (each query's identity-and-camera images averaged): rank-1 {tr['rank1']:.4f}, "
            f"mAP {tr['mAP']:.4f}, mINP {tr['mINP']:.4f}"
        )
    if "rerank" in val:
        rr = val["rerank"]
        typer.echo(
            f"re-ranked: rank-1 {rr['rank1']:.4f}, mAP {rr['mAP']:.4f}, mINP {rr['mINP']:.4f} "
            f"in {rr['rerank_seconds']:.2f} s, peak {rr['rerank_peak_mb']:.0f} MB"
        )


def evaluate_reid(
    source: Annotated[Path, typer.Argument(help="A re-ID run directory or bundle directory.")],
    out: Annotated[
        Path | None, Opt(help="Folder for the metrics JSON and plots (default SOURCE/eval).")
    ] = None,
    protocol: Annotated[
        str, Opt(help="validation (the split's validation identities) | market-test (original layout).")
    ] = "validation",
    data_root: DataRoot = None,
    split_file: Annotated[
        Path | None, Opt(help="Split JSON (default: the run's split.json / the bundle's recorded split).")
    ] = None,
    rerank: Annotated[bool, Opt("--rerank", help="Also evaluate with k-reciprocal re-ranking.")] = False,
    distractors: Annotated[
        Path | None,
        Opt(
            help="Folder of crops of other people added to the validation gallery (e.g. the course "
            "test/ folder): the protocol that predicts a real test. Evaluated after the plain one."
        ),
    ] = None,
    record: Annotated[
        bool,
        Opt(
            "--record",
            help="SOURCE is a bundle: write what was measured into its manifest (the distractor "
            "protocol's metrics, and the query-expansion section the service uses); weights unchanged.",
        ),
    ] = False,
    device: Annotated[str, Opt(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, Opt(help="Images per forward pass.")] = 256,
    cache_dir: Annotated[Path | None, Opt(help="Decoded-image cache folder.")] = None,
    threads: Annotated[int, Opt(help="Torch CPU threads (0: one per core).")] = 0,
    progress: Annotated[bool, Opt("--progress/--no-progress")] = True,
) -> None:
    """Metrics and plots of a run's best checkpoint or of a bundle: the validation protocol of training
    (with --distractors also against a gallery of distractors), or the official Market-1501
    query/gallery test (original layout only)."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        if protocol not in ("validation", "market-test"):
            raise ValueError(f"--protocol must be validation or market-test, got {protocol!r}")
        if distractors is not None and protocol != "validation":
            raise ValueError("--distractors extends the validation protocol; market-test has its own")
        results = evaluate_source(
            source,
            out,
            protocol,
            data_root,
            split_file,
            rerank,
            device,
            batch_size,
            cache_dir,
            progress,
            distractors=distractors,
        )
    except user_errors() as exc:
        raise fail(str(exc)) from None
    for result in results:
        typer.echo(f"{result['name']}:")
        print_metrics(result["metrics"])
        typer.echo(f"wrote {result['file']}")
    if record:
        try:
            typer.echo(f"recorded in {record_in_manifest(source, results)}")
        except user_errors() as exc:
            raise fail(str(exc)) from None


def record_in_manifest(bundle: Path, results: list[dict[str, Any]]) -> Path:
    """Write evaluated metrics into a re-ID bundle's manifest (not its weights); returns the manifest."""
    from app.bundle import MANIFEST, QueryExpansionSpec, read_manifest, write_manifest
    from training.tasks.reid_outputs import query_expansion_spec

    if not (bundle / MANIFEST).is_file():
        raise ValueError(f"--record needs a bundle directory; {bundle} has no {MANIFEST}")
    manifest = read_manifest(bundle)
    by_name = {r["name"]: r["metrics"] for r in results}
    if "validation" not in by_name:
        raise ValueError("--record needs the validation protocol")
    estimate = next(
        (m["unlabelled_threshold"] for m in by_name.values() if "unlabelled_threshold" in m), None
    )
    if manifest.training_config.get("train_all"):
        evaluated = by_name["validation"].get("query_expansion", {}).get("gallery_side")
        return _record_thresholds(bundle, manifest, estimate, evaluated)
    scalars = {
        name: {k: v for k, v in m.items() if isinstance(v, int | float)}
        for name, m in by_name.items()
        if name != "validation"
    }
    if estimate is not None:  # next to the labelled thresholds, to judge the estimate
        scalars.setdefault("validation_distractors", {})["unlabelled_threshold"] = estimate
    others = {k: v for k, v in by_name.items() if k != "validation"}
    update: dict[str, Any] = {"metrics": {**manifest.metrics, **scalars}}
    if "query_expansion" in by_name["validation"]:
        spec = query_expansion_spec(by_name["validation"], **others)
        update["query_expansion"] = QueryExpansionSpec.model_validate(spec)
    write_manifest(bundle, manifest.model_copy(update=update))
    return bundle / MANIFEST


def _record_thresholds(
    bundle: Path, manifest: Any, estimate: dict[str, Any] | None, evaluated: dict[str, Any] | None
) -> Path:
    """A bundle trained on every identity keeps its split run's metrics; only its own thresholds,
    estimated on the distractor crops, are recorded. They are estimated for this version's
    gallery-side query path (``evaluated``), so the borrowed one must be the same."""
    from app.bundle import MANIFEST, write_manifest

    if estimate is None:
        raise ValueError(
            f"{bundle} was trained on every identity (its validation identities were seen): --record "
            "needs --distractors, on whose crops its match thresholds are estimated"
        )
    source = f"estimated on {estimate['crops']} unlabelled crops (evaluate-reid --distractors)"
    update: dict[str, Any] = {
        "match_threshold": estimate["match_threshold"],
        "metrics": {**manifest.metrics, "match_threshold_source": source},
    }
    if manifest.query_expansion is not None:
        qe_update: dict[str, Any] = {"match_threshold": estimate["match_threshold_expanded"]}
        gs = manifest.query_expansion.gallery_side
        if gs is not None and evaluated is not None:
            recorded = gs.model_dump(exclude={"match_threshold"})
            if any(recorded[key] != evaluated.get(key) for key in recorded):
                raise ValueError(
                    f"{bundle} carries a gallery-side query path ({recorded}) other than the one this "
                    f"version evaluates ({ {k: evaluated.get(k) for k in recorded} }): record the split "
                    "run's bundle first, then export this run again with --metrics-from it"
                )
        if gs is not None and "match_threshold_gallery_side" in estimate:
            qe_update["gallery_side"] = gs.model_copy(
                update={"match_threshold": estimate["match_threshold_gallery_side"]}
            )
        update["query_expansion"] = manifest.query_expansion.model_copy(update=qe_update)
    write_manifest(bundle, manifest.model_copy(update=update))
    return bundle / MANIFEST


def evaluate_source(
    source: Path,
    out: Path | None,
    protocol: str,
    data_root: Path | None,
    split_file: Path | None,
    rerank: bool,
    device: str,
    batch_size: int,
    cache_dir: Path | None,
    progress: bool,
    *,
    distractors: Path | None = None,
) -> list[dict[str, Any]]:
    """Load a run's best model or a bundle, build the evaluation set(s), evaluate, write outputs."""
    import tempfile

    from app.bundle import MANIFEST
    from app.nets.bundles import build_network, load_bundle
    from training.data.market import load_market
    from training.engine import BEST, CONFIG_FILE, load_checkpoint, resolve_device
    from training.tasks.reid import ReIDTrainConfig
    from training.tasks.reid_data import load_reid_data, market_test_set, with_distractors
    from training.tasks.reid_outputs import write_reid_outputs

    target = resolve_device(device)
    if (source / MANIFEST).is_file():
        manifest, model = load_bundle(source, device=str(target))
        if manifest.task != "reid":
            raise ValueError(f"{source} is a {manifest.task} bundle, not a re-ID bundle")
        if manifest.onnx is not None and target.type == "cpu":
            from training.onnx_export import OnnxModule

            model = OnnxModule(source)  # what the service runs; the torch network stays the reference
        config = ReIDTrainConfig.from_dict(manifest.training_config)
        recorded = Path(config.run_dir) / "split.json" if config.run_dir else None
    elif (source / BEST).is_file():
        config = ReIDTrainConfig.load(source / CONFIG_FILE)
        ckpt = load_checkpoint(source / BEST)
        model = build_network("reid", ckpt["architecture"])
        model.load_state_dict(ckpt["model"])
        model.to(target)
        recorded = source / "split.json"
    else:
        raise FileNotFoundError(f"{source}: neither a bundle ({MANIFEST}) nor a run directory ({BEST})")
    config = config.replace(
        data_root=str(data_root) if data_root else config.data_root,
        cache_dir=str(cache_dir) if cache_dir else config.cache_dir,
        progress=progress,
        data_fingerprint="",  # evaluating on other data is allowed; the fingerprint is reported
    )
    if protocol == "market-test":
        data = load_market(config.data_root, "auto")
        eval_set = market_test_set(
            data, config.input_size, config.cache_dir or None, workers=config.workers, progress=progress
        )
        config.data_fingerprint = data.fingerprint
    else:
        split = split_file or (recorded if recorded is not None and recorded.is_file() else None)
        if split is None:  # the split is deterministic in (data, seed, fraction): recompute it
            typer.echo("no recorded split found: recomputing it from the data, seed and fraction", err=True)
        config.split_file = str(split) if split else None
        if split_file:  # an explicit split names the identities to evaluate: no --limit-ids subset
            config.limit_ids = None
        with tempfile.TemporaryDirectory() as scratch:  # resolve_split writes a copy; keep it out of SOURCE
            eval_set = load_reid_data(config, scratch).validation_set(config.eval_seed)
    sets = [eval_set]
    if distractors is not None:
        sets.append(
            with_distractors(
                eval_set, distractors, config.input_size, config.cache_dir or None, progress=progress
            )
        )
    out = out or source / "eval"
    results = []
    for current in sets:
        result = write_reid_outputs(
            model, current, out, device=target, batch_size=batch_size, rerank=rerank, progress=progress
        )
        result["source"] = str(source)
        result["data_fingerprint"] = config.data_fingerprint
        name = current.name
        file = out / ("val_metrics.json" if name == "validation" else f"{name}_metrics.json")
        file.write_text(json.dumps(result, indent=1) + "\n")
        results.append({**result, "name": name, "metrics": result[name], "out": out, "file": file})
    return results
