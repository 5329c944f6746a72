"""After a re-ID run: the final evaluation with its plots, the run's report, and the bundle fields
``reid-train export`` writes into the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.retrieval import QE_NEIGHBOURS
from training.evaluation.reid import unlabelled_threshold
from training.tasks.reid import ReIDTask, ReIDTrainConfig, embed, evaluate_embeddings
from training.tasks.reid_data import DISTRACTOR_PID, EvalSet

SUMMARY_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP", "map80", "map80_all_cameras")


def write_reid_outputs(
    model: nn.Module,
    eval_set: EvalSet,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    rerank: bool = False,
    query_expansion: int = QE_NEIGHBOURS,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``eval_set``; write ``val_metrics.json`` (or ``test_metrics.json``) and plots.

    The metrics are stored under the set's name (``validation`` / ``market_test``); with
    ``query_expansion`` (neighbours, 0 = off) also those of the service's alpha-QE under
    ``query_expansion``.
    """
    from training.plots.reid import plot_cmc, plot_ranked_lists, plot_tsne

    out_dir = Path(out_dir)
    plots = out_dir / ("plots_distractors" if eval_set.name.endswith("_distractors") else "plots")
    plots.mkdir(parents=True, exist_ok=True)
    images, pids, camids = eval_set.images, eval_set.pids, eval_set.camids
    embeddings = embed(model, images, device, batch_size, progress=progress, desc=eval_set.name)
    metrics, last = evaluate_embeddings(
        embeddings,
        pids,
        camids,
        eval_set.is_query,
        rerank=rerank,
        query_expansion=query_expansion,
        track_queries=True,
        gallery_side=bool(query_expansion),
    )
    q, g = last["query"], last["gallery"]
    if (pids == DISTRACTOR_PID).sum() >= 4:  # for bundles trained on every identity, and to compare
        crops = embeddings.numpy()[pids == DISTRACTOR_PID]
        metrics["unlabelled_threshold"] = {
            "match_threshold": unlabelled_threshold(crops)["threshold"],
            "match_threshold_expanded": unlabelled_threshold(crops, query_expansion=query_expansion)[
                "threshold"
            ],
            "match_threshold_gallery_side": unlabelled_threshold(
                crops, query_expansion=query_expansion, gallery_side=True
            )["threshold"],
            "crops": len(crops),
        }
    result = {
        eval_set.name: metrics,
        "protocol": {
            "set": eval_set.name,
            "description": eval_set.note,
            "identities": len(set(pids[pids > 0].tolist())),
            "images": len(pids),
            "distractors": int((pids == DISTRACTOR_PID).sum()),
            "queries": len(q),
            "gallery": len(g),
            "scored_queries": metrics["num_queries"],
            "exclusion": "same identity and same camera, and junk (pid -1) (Market-1501)",
        },
    }
    file = "val_metrics.json" if eval_set.name == "validation" else f"{eval_set.name}_metrics.json"
    (out_dir / file).write_text(json.dumps(result, indent=1) + "\n")
    curves = {"cosine": metrics["cmc"]}
    if rerank:
        curves["k-reciprocal re-ranking"] = last["rerank_cmc"]
    plot_cmc(curves, plots / "cmc.png")
    people = pids > 0  # distractors are many people under one pid: not an identity to plot
    plot_tsne(embeddings.numpy()[people], pids[people], plots / "tsne.png")
    plot_ranked_lists(
        images[q],
        images[g],
        last["distmat"],
        pids[q],
        pids[g],
        camids[q],
        camids[g],
        plots / "ranked_lists.png",
    )
    return result


def finish_reid_run(task: ReIDTask, run_dir: str | Path, *, rerank: bool = False) -> dict[str, Any]:
    """Evaluate the best checkpoint; write val_metrics.json, plots and report.md into the run."""
    from training.engine import BEST, METRICS_FILE, load_checkpoint
    from training.plots.curves import plot_curves

    run_dir = Path(run_dir)
    best = load_checkpoint(run_dir / BEST)
    task.model.load_state_dict(best["model"])
    task.model.to(task.device)
    result = write_reid_outputs(
        task.model,
        task.data.validation_set(task.config.eval_seed),
        run_dir,
        device=task.device,
        batch_size=task.config.eval_batch_size,
        rerank=rerank,
    )
    result["best_epoch"] = best["epoch"]
    result["images"] = {"train": len(task.data.train), "val": len(task.data.val)}
    trained = len(set(task.data.train_pids.tolist()))
    result["identities"] = {"train": trained, "val": len(task.data.split.val_ids)}
    if task.config.train_all:  # the numbers say how well it fits, not how well it generalises
        result["protocol"]["description"] += "; these identities were trained on (--train-all)"
    (run_dir / "val_metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    history = json.loads((run_dir / METRICS_FILE).read_text())
    plots = run_dir / "plots"
    losses = [
        "train_loss",
        "val_loss",
        "train_triplet_avg",
        "train_triplet_max",
        "train_id_avg",
        "train_id_max",
    ]
    plot_curves(history, plots / "loss.png", losses, title="Loss")
    plot_curves(history, plots / "retrieval.png", ["rank1", "mAP", "mINP", "map80"], title="Validation")
    (run_dir / "report.md").write_text(reid_report(task.config, result, history))
    return result


def reid_report(config: ReIDTrainConfig, result: dict[str, Any], history: list[dict[str, Any]]) -> str:
    """A short markdown report linking the plots."""
    val, proto = result["validation"], result["protocol"]
    seconds = [r["seconds"] for r in history]
    speed = [r["images_per_s"] for r in history]
    loss = "lambda (T_max + T_avg" + (" + CE_max + CE_avg)" if config.id_loss else ")")
    lines = [
        "# Re-ID run",
        "",
        f"- Recipe `{config.recipe}`: {config.triplet} triplet loss, margin {config.margin}, "
        f"loss = {loss} with lambda {config.loss_lambda}, label smoothing {config.label_smoothing}",
        f"- Backbone `{config.backbone}`, input {config.input_size[0]}x{config.input_size[1]}, last stride "
        f"{config.last_stride}, branch dim {config.branch_dim}, init weights `{config.init_weights}`",
        f"- Data `{config.data_root}` ({config.layout} layout, "
        f"fingerprint `{config.data_fingerprint[:12]}`): "
        f"{result['identities']['train']} / {result['identities']['val']} identities, "
        f"{result['images']['train']} / {result['images']['val']} images (train / validation)",
        f"- {len(history)} epochs, best epoch {result['best_epoch']} (by `{config.monitor}`); "
        f"{sum(seconds) / max(len(seconds), 1):.0f} s per epoch, "
        f"{sum(speed) / max(len(speed), 1):.0f} training images/s",
        "",
        "## Validation (best epoch, Market-1501 protocol)",
        "",
        f"{proto['description']}: {proto['queries']} queries ({proto['scored_queries']} scored), "
        f"{proto['gallery']} gallery images.",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {val[k]:.4f} |" for k in SUMMARY_KEYS]
    lines.append(
        f"| match threshold (cosine, 1% false matches) | {val['match_threshold']:.4f} "
        f"(true-match rate {val['true_match_rate_at_threshold']:.3f}) |"
    )
    if "rerank" in val:
        rr = val["rerank"]
        lines += [
            "",
            f"With k-reciprocal re-ranking: rank-1 {rr['rank1']:.4f}, mAP {rr['mAP']:.4f}, "
            f"mINP {rr['mINP']:.4f} ({rr['rerank_seconds']:.1f} s, {rr['rerank_peak_mb']:.0f} MB peak).",
        ]
    lines += [
        "",
        "`map80` is the report's course metric (AP over the first 80 results); `map80_all_cameras` keeps "
        "same-camera matches, as the report's evaluation did. Definitions: `training/evaluation/reid.py`.",
        "",
        "## Plots",
        "",
        "![loss](plots/loss.png) ![validation](plots/retrieval.png)",
        "",
        "![CMC](plots/cmc.png) ![t-SNE](plots/tsne.png)",
        "",
        "![ranked lists](plots/ranked_lists.png)",
        "",
    ]
    return "\n".join(lines)


def manifest_fields(
    checkpoint: dict[str, Any], run_dir: str | Path, metrics_from: Any = None
) -> dict[str, Any]:
    """Bundle fields of a re-ID run (``training/export.py``): embedding, match threshold, metrics.

    The identity classifiers are training-only: this drops them from ``checkpoint`` in place (weights,
    and ``num_classes`` = 0 in its architecture) so the bundle holds the embedding network alone.
    A ``--train-all`` run has no unseen identities left to measure: its metrics, threshold and query
    expansion come from ``metrics_from``, the manifest of the same recipe's run on the split, until
    ``evaluate-reid --distractors --record`` re-estimates the thresholds for these weights.
    """
    classes = checkpoint["architecture"].get("num_classes")  # the training identities
    checkpoint["architecture"] = {**checkpoint["architecture"], "num_classes": 0}
    checkpoint["model"] = {k: v for k, v in checkpoint["model"].items() if ".classifier." not in k}
    # The embedding concatenates every BN neck: the two branches' and any stripe parts'.
    dim = sum(int(v.shape[0]) for k, v in checkpoint["model"].items() if k.endswith(".neck.weight"))
    embedding = {"dim": dim, "normalized": True, "distance": "cosine"}
    if checkpoint.get("config", {}).get("train_all"):
        if metrics_from is None:
            raise ValueError(
                "a --train-all run saw every identity, so it has no validation of its own: pass "
                "--metrics-from BUNDLE, the bundle of the same recipe trained on the split"
            )
        metrics = {
            **metrics_from.metrics,
            "best_epoch": checkpoint["epoch"],
            "trained_on": "every identity (--train-all); validation metrics are the split run's",
            "metrics_from": f"{metrics_from.name} {metrics_from.version}",
        }
        if classes:
            metrics["identities"] = classes
        fields = {"embedding": embedding, "match_threshold": metrics_from.match_threshold, "metrics": metrics}
        if metrics_from.query_expansion is not None:
            fields["query_expansion"] = metrics_from.query_expansion.model_dump()
        return fields
    metrics = {k: v for k, v in checkpoint["metrics"].items() if isinstance(v, int | float)}
    final = Path(run_dir) / "val_metrics.json"
    if final.is_file():  # the best epoch re-evaluated after training
        saved = json.loads(final.read_text())
        metrics = {k: v for k, v in saved["validation"].items() if isinstance(v, int | float)}
        metrics["protocol"] = saved.get("protocol", {})
    metrics["best_epoch"] = checkpoint["epoch"]
    fields = {
        "embedding": embedding,
        "match_threshold": metrics.get("match_threshold"),
        "metrics": metrics,
    }
    if final.is_file() and "query_expansion" in saved["validation"]:
        fields["query_expansion"] = query_expansion_spec(saved["validation"])
    return fields


def query_expansion_spec(validation: dict[str, Any], **protocols: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``query_expansion`` section from evaluated metrics: the threshold of the plain
    validation protocol (as the plain ``match_threshold``), and mAP / rank-1 with and without it for
    that protocol and any other (``validation_distractors=...``)."""
    qe = validation["query_expansion"]
    measured = {"validation": validation, **protocols}
    spec = {
        "neighbours": qe["neighbours"],
        "alpha": qe.get("alpha", 3.0),  # evaluations before 2026-12-01 weighted neighbours sim^3
        "match_threshold": qe["match_threshold"],
        "metrics": {
            name: {
                "mAP": m["mAP"],
                "rank1": m["rank1"],
                "mAP_expanded": m["query_expansion"]["mAP"],
                "rank1_expanded": m["query_expansion"]["rank1"],
                **(
                    {
                        "mAP_gallery_side": m["query_expansion"]["gallery_side"]["mAP"],
                        "rank1_gallery_side": m["query_expansion"]["gallery_side"]["rank1"],
                    }
                    if "gallery_side" in m["query_expansion"]
                    else {}
                ),
            }
            for name, m in measured.items()
            if "query_expansion" in m
        },
    }
    if "gallery_side" in qe:
        gs = qe["gallery_side"]
        spec["gallery_side"] = {
            key: gs[key]
            for key in ("order", "neighbours", "alpha", "weight", "shortlist", "pool", "match_threshold")
            if key in gs
        }
    return spec
