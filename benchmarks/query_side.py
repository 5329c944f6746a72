"""What the query side gives on the distractor validation: query expansion, flip, track queries,
shortlist re-ranking and two-bundle ensembles, scored in NumPy from embeddings saved once (a script,
not a test; docs/models.md, "What the query side can still give").

    # once per bundle: ONNX embeddings of the split's validation images and the 19,679 distractors
    python benchmarks/query_side.py dump models_store/reid /tmp/reid.npz --data-root $REID_DATA_ROOT
    # the table rows: plain, query expansion grid, track queries, shortlist re-ranking
    python benchmarks/query_side.py score /tmp/reid.npz [--flip] [--rerank 200,10,3,0.3 ...]
    # the service's gallery-side query path (app.retrieval.rescore_shortlists), one point each:
    # ORDER,NEIGHBOURS,ALPHA,WEIGHT[,SHORTLIST,POOL,EXPANSION]
    python benchmarks/query_side.py score /tmp/reid.npz --path augment_first,5,3,0.75
    # k-reciprocal re-ranking over the whole gallery, as predict-reid --rerank (one grid point each)
    python benchmarks/query_side.py score /tmp/reid.npz --flip --full-rerank 20,6,0.3
    # two bundles' embeddings concatenated (the second weighted w): an ensemble's ceiling
    python benchmarks/query_side.py score /tmp/reid.npz --ensemble /tmp/reid-128x64.npz:0.3
    # who is first when rank-1 fails: distractors or other validation people, and any hubs
    python benchmarks/query_side.py score /tmp/reid.npz --failures

Protocol: the committed split's 150 validation identities (one query per identity and camera), the
gallery their other images plus the course ``test/`` crops as distractors, Market-1501 exclusions.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPLIT = ROOT / "splits" / "market1501-course-seed0.json"


def dump(bundle: Path, out: Path, data_root: Path, cache: Path, threads: int) -> None:
    """Save the bundle's embeddings (plain and flipped) of the validation set and the distractors."""
    import torch

    from app.nets.bundles import load_bundle
    from training.data.cache import cached_images
    from training.data.market import list_images
    from training.onnx_export import OnnxModule
    from training.tasks.reid import ReIDTrainConfig, embed
    from training.tasks.reid_data import load_reid_data

    torch.set_num_threads(threads)
    manifest, _ = load_bundle(bundle)
    model = OnnxModule(bundle)
    config = ReIDTrainConfig.from_dict(manifest.training_config).replace(
        data_root=str(data_root),
        cache_dir=str(cache),
        progress=False,
        data_fingerprint="",
        split_file=str(SPLIT),
        train_all=False,
        limit_ids=None,
    )
    with tempfile.TemporaryDirectory() as scratch:
        data = load_reid_data(config, scratch)
    validation = data.validation_set(0)
    distractors = cached_images(
        list_images(data_root / "test"), config.input_size, str(cache), progress=False
    )
    saved = {"pids": validation.pids, "camids": validation.camids, "is_query": validation.is_query}
    for name, images in (("val", validation.images), ("dis", distractors)):
        start = time.perf_counter()
        saved[name] = embed(model, images, batch_size=64).numpy()
        saved[name + "_flip"] = embed(model, images.flip(-1), batch_size=64).numpy()
        print(f"{name}: {len(images)} images in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    np.savez(out, **saved)


def normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def features(saved: np.lib.npyio.NpzFile, flip: bool) -> np.ndarray:
    """Validation then distractor embeddings, L2-normalised (flip: the mean with the mirrored crop's)."""
    f = np.concatenate([saved["val"], saved["dis"]])
    if flip:
        f = normalised(f) + normalised(np.concatenate([saved["val_flip"], saved["dis_flip"]]))
    return normalised(f)


def shortlist_rerank(fq: np.ndarray, fg: np.ndarray, n: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """Distances after k-reciprocal re-ranking of each query among itself and its top ``n`` gallery
    entries (the rest keep their order, after them)."""
    from training.evaluation.rerank import re_ranking

    sim = fq @ fg.T
    dist = 3.0 - sim  # past any re-ranked distance (those lie in [0, 2])
    for i in range(len(fq)):
        top = np.argpartition(-sim[i], n)[:n]
        points = np.concatenate([fq[i : i + 1], fg[top]])
        d = np.sqrt(np.maximum(2.0 - 2.0 * points @ points.T, 0.0))
        dist[i, top] = re_ranking(d[:1, 1:], d[:1, :1], d[1:, 1:], k1=k1, k2=k2, lambda_value=lam)[0]
    return dist


def failures(
    sim: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray
) -> None:
    """Who takes the first place when rank-1 fails: distractors or other validation people, and
    whether a few gallery entries ("hubs") take it for many queries."""
    same_person = g_pids[None] == q_pids[:, None]
    same_camera = g_cams[None] == q_cams[:, None]
    scored = (same_person & ~same_camera).any(1)  # queries with a findable match, as evaluate_ranking
    sim = np.where(same_person & same_camera, -9.0, sim)[scored]
    q_pids = q_pids[scored]
    top = sim.argmax(1)
    failed = g_pids[top] != q_pids
    culprits = top[failed]
    counts = np.bincount(culprits, minlength=len(g_pids))
    by_distractor = int((g_pids[culprits] == 0).sum())
    print(
        f"rank-1 failures {failed.sum()} of {len(q_pids)} ({failed.mean():.1%}): a distractor first for "
        f"{by_distractor} ({by_distractor / max(failed.sum(), 1):.0%}), another validation person for "
        f"{failed.sum() - by_distractor}; {int((counts > 0).sum())} distinct entries, the most frequent "
        f"first for {int(counts.max())} queries",
        flush=True,
    )


def score(args: argparse.Namespace) -> None:
    from app.retrieval import augmented_gallery, expand_against
    from training.evaluation.reid import evaluate_ranking, track_embeddings

    saved = np.load(args.embeddings)
    f = features(saved, args.flip)
    for extra in args.ensemble:
        path, weight = extra.rsplit(":", 1)
        w = float(weight)
        f = normalised(
            np.concatenate([f * np.sqrt(1 - w), features(np.load(path), args.flip) * np.sqrt(w)], 1)
        )
    distractors = len(saved["dis"])
    pids = np.concatenate([saved["pids"], np.zeros(distractors, int)])
    cams = np.concatenate([saved["camids"], -np.ones(distractors, int)])
    is_query = np.concatenate([saved["is_query"], np.zeros(distractors, bool)])
    q, g = np.flatnonzero(is_query), np.flatnonzero(~is_query)

    def report(name: str, dist: np.ndarray) -> None:
        r = evaluate_ranking(dist, pids[q], pids[g], cams[q], cams[g], max_rank=10)
        print(f"{name:40} mAP {r['mAP']:.4f}  rank-1 {r['rank1']:.4f}  mINP {r['mINP']:.4f}", flush=True)

    if args.failures:
        failures(f[q] @ f[g].T, pids[q], pids[g], cams[q], cams[g])
    tracks = track_embeddings(f, pids, cams, q)
    for spec in args.dba:
        k, alpha, *shortlist = spec.split(",")
        augmented = augmented_gallery(f[g], neighbours=int(k), alpha=float(alpha))
        for n in map(int, shortlist):  # what a service can afford: the expanded query's top n re-scored
            expanded = expand_against(f[q], f[g], k=3, alpha=1.0)
            sim = expanded @ f[g].T
            dist = 3.0 - sim
            top = np.argpartition(-sim, n, axis=1)[:, :n]
            rescored = np.einsum("qd,qnd->qn", expanded, augmented[top])
            np.put_along_axis(dist, top, 1.0 - rescored, axis=1)
            report(f"query expansion 3, sim^1, then gallery-side {k},{alpha} on the top {n}", dist)
        report(f"gallery-side {spec}, plain", 1 - f[q] @ augmented.T)
        for qk, qalpha in ((3, 1.0), (5, 3.0)):
            expanded = expand_against(f[q], augmented, k=qk, alpha=qalpha)
            report(f"gallery-side {spec}, query expansion {qk}, sim^{qalpha:g}", 1 - expanded @ augmented.T)
    for label, queries in (("", f[q]), ("track ", tracks)):
        report(f"{label}plain", 1 - queries @ f[g].T)
        for k, alpha in ((3, 1.0), (5, 3.0)):
            expanded = expand_against(queries, f[g], k=k, alpha=alpha)
            report(f"{label}query expansion {k}, sim^{alpha:g}", 1 - expanded @ f[g].T)
    for spec in args.path:
        from app.retrieval import GS_POOL, GS_SHORTLIST, QE_NEIGHBOURS, rescore_shortlists

        order, k, alpha, weight, *rest = spec.split(",")
        defaults = [GS_SHORTLIST, GS_POOL, QE_NEIGHBOURS]
        shortlist, pool, expansion = [int(v) for v in rest] + defaults[len(rest) :]
        start = time.perf_counter()
        scores, inside, _ = rescore_shortlists(
            f[q], f[g], order=order, neighbours=int(k), alpha=float(alpha), weight=float(weight),
            shortlist=shortlist, pool=pool, expansion=expansion,
        )  # fmt: skip
        ms = 1e3 * (time.perf_counter() - start) / len(q)
        report(f"{order} {k},{alpha},{weight} {shortlist}/{pool}, QE {expansion} ({ms:.0f} ms/q)",
               np.where(inside, 1.0 - scores, 3.0 - scores))  # fmt: skip
    for spec in args.rerank:
        n, k1, k2, lam = spec.split(",")
        start = time.perf_counter()
        dist = shortlist_rerank(f[q], f[g], int(n), int(k1), int(k2), float(lam))
        ms = 1e3 * (time.perf_counter() - start) / len(q)
        report(f"shortlist re-rank {spec} ({ms:.0f} ms/query)", dist)
    for spec in args.full_rerank:
        from training.evaluation.rerank import re_ranking_sparse

        k1, k2, lam = spec.split(",")
        start = time.perf_counter()
        dist = re_ranking_sparse(f[q], f[g], k1=int(k1), k2=int(k2), lambda_value=float(lam))
        report(f"full re-rank {spec} ({time.perf_counter() - start:.0f} s)", dist)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="save a bundle's embeddings")
    d.add_argument("bundle", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--data-root", type=Path, required=True)
    d.add_argument("--cache-dir", type=Path, default=Path("cache"))
    d.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("score", help="score saved embeddings")
    s.add_argument("embeddings", type=Path)
    s.add_argument("--flip", action="store_true", help="average with the mirrored crops' embeddings")
    s.add_argument("--failures", action="store_true", help="who is first when rank-1 fails (plain path)")
    s.add_argument("--ensemble", action="append", default=[], metavar="NPZ:WEIGHT")
    s.add_argument("--rerank", action="append", default=[], metavar="N,K1,K2,LAMBDA")
    s.add_argument("--dba", action="append", default=[], metavar="K,ALPHA[,SHORTLIST...]")
    s.add_argument("--full-rerank", action="append", default=[], metavar="K1,K2,LAMBDA")
    s.add_argument("--path", action="append", default=[], metavar="ORDER,K,ALPHA,WEIGHT[,SHORTLIST,POOL,QE]")
    args = parser.parse_args()
    if args.command == "dump":
        dump(args.bundle, args.out, args.data_root, args.cache_dir, args.threads)
    else:
        score(args)


if __name__ == "__main__":
    main()
