"""Where the gallery's vectors are searched: a plain registry of index builders and one build function.

``faiss``: ``app.gallery.index.GalleryIndex``, in this process (snapshots in the data directory).
``milvus``: ``app.gallery.milvus_index.MilvusIndex``, in Milvus Lite or a Milvus server (imported only
when chosen, so the service runs without pymilvus installed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _faiss(dim: int, **options: Any) -> Any:
    from app.gallery.index import GalleryIndex

    keep = {k: options[k] for k in ("threads", "exact_max", "build_threads") if k in options}
    return GalleryIndex(dim, **keep)


def _milvus(dim: int, **options: Any) -> Any:
    from app.gallery.milvus_index import MilvusIndex

    if not options.get("uri"):
        raise ValueError("the milvus backend needs a URI (REID_MILVUS_URI)")
    return MilvusIndex(dim, uri=options["uri"], name=options["name"], token=options.get("token"))


VECTOR_BACKENDS: dict[str, Callable[..., Any]] = {"faiss": _faiss, "milvus": _milvus}


def build_index(backend: str, dim: int, **options: Any) -> Any:
    """The index of ``backend`` for ``dim``-d vectors; each builder takes the options it knows."""
    try:
        builder = VECTOR_BACKENDS[backend]
    except KeyError:
        raise KeyError(f"unknown vector backend {backend!r}; known: {', '.join(VECTOR_BACKENDS)}") from None
    return builder(dim, **options)
