"""Prometheus metrics, one registry per app (so several apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from app.gallery.reembed import ReembedJob
    from app.inference import Models

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's counters, histograms and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "reid_http_requests",
            "HTTP requests by route template, method and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "reid_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "reid_inference_seconds",
            "Forward-pass time per batch, by model task.",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.crops = Counter(
            "reid_inference_crops",
            "Crops run through a model, by task.",
            ["task"],
            registry=self.registry,
        )
        self.gallery_searchable = Gauge(
            "reid_gallery_searchable_entries",
            "Entries in the search index (made by the loaded re-ID bundle).",
            registry=self.registry,
        )
        self.search = Histogram(
            "reid_gallery_search_seconds",
            "Index search time per query (including filter resolution).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.index_write_failures = Counter(
            "reid_gallery_index_write_failures",
            "Committed changes the vector index refused at first (applied later from the change log).",
            registry=self.registry,
        )
        self.change_log_gaps = Counter(
            "reid_gallery_change_log_gaps",
            "Times this replica found change-log rows it had not read pruned, and rebuilt its index.",
            registry=self.registry,
        )

        self.model_info = Gauge(
            "reid_model_info",
            "The loaded bundles (value 1): task, name, version and the runtime that runs them.",
            ["task", "name", "version", "runtime"],
            registry=self.registry,
        )

        # The service's current or last re-embedding run (read from the job when scraped).
        self.reembed_running = Gauge(
            "reid_reembed_running", "1 while a re-embedding run is going.", registry=self.registry
        )
        self.reembed_total = Gauge(
            "reid_reembed_total_entries",
            "Outdated entries when the current or last re-embedding run started.",
            registry=self.registry,
        )
        self.reembed_entries = Gauge(
            "reid_reembed_entries",
            "Entries the current or last re-embedding run has dealt with, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.reembed_rate = Gauge(
            "reid_reembed_crops_per_second",
            "Entries written per second by the current or last re-embedding run.",
            registry=self.registry,
        )

    def describe_models(self, models: Models) -> None:
        for model in (models.attributes, models.reid):
            self.model_info.labels(model.task, model.name, model.version, model.runtime.name).set(1)

    def observe_inference(self, task: str, seconds: float, crops: int) -> None:
        self.inference.labels(task).observe(seconds)
        self.crops.labels(task).inc(crops)

    def track_gallery(self, size: Callable[[], float]) -> None:
        self.gallery_searchable.set_function(size)

    def track_reembed(self, job: ReembedJob) -> None:
        self.reembed_running.set_function(lambda: float(job.running))
        self.reembed_total.set_function(lambda: job.progress.total)
        self.reembed_rate.set_function(lambda: job.progress.crops_per_second)
        for outcome in ("reembedded", "without_image", "failed", "skipped"):
            self.reembed_entries.labels(outcome).set_function(
                lambda outcome=outcome: getattr(job.progress, outcome)
            )
