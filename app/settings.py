"""Service settings: environment variables with the prefix ``REID_``, built once in ``create_app``.

Relative paths are relative to the current directory. ``docs/service.md`` has the full table.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

SQLITE_FILE = "gallery.sqlite3"
LOCAL_MODELS_DIR = Path("models_store")
# The bundles shipped with the package sit beside app/: in a checkout (so also in an editable install)
# and in site-packages, where the wheel puts models_store/ (pyproject's package data).
SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models_store"


def default_models_dir() -> Path:
    """``./models_store`` when the current directory has one (where ``reid-train export`` writes), else
    the bundles shipped with the package."""
    return LOCAL_MODELS_DIR if LOCAL_MODELS_DIR.is_dir() else SHIPPED_MODELS_DIR


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="REID_", extra="ignore", populate_by_name=True)

    # Models
    models_dir: Path = Field(
        default_factory=default_models_dir,
        description="Folder holding the 'attributes' and 'reid' bundles (used when the two below are unset); "
        "default ./models_store if present, else the bundles shipped with the package.",
    )
    attribute_bundle: Path | None = Field(
        default=None, description="Attribute bundle directory; default <models_dir>/attributes."
    )
    reid_bundle: Path | None = Field(
        default=None, description="Re-ID bundle directory; default <models_dir>/reid."
    )

    # Storage
    data_dir: Path = Field(default=Path("data"), description="Where the SQLite file lives.")
    database_url: str | None = Field(
        default=None,
        repr=False,  # may hold a password
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user:pass@host/db; "
        f"default sqlite:///<data_dir>/{SQLITE_FILE}.",
    )
    database_password_file: Path | None = Field(
        default=None,
        description="File holding the password for database_url when the URL has none (docker-compose's "
        "generated one); trailing newlines are dropped. A password in the URL wins.",
    )
    store_images: bool = Field(
        default=True,
        description="Keep each enrolled crop as uploaded, in the database (served at /gallery/{id}/image, "
        "read by re-embedding); false for deployments that must not keep images.",
    )
    index_sync_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How often the service reads the database's change log and applies other processes' "
        "writes (other replicas, reid-serve reembed) to its index; 0: never.",
    )
    index_snapshots: bool = Field(
        default=True,
        description="Keep the index in <data_dir>/index with the change-log position it reflects, load it "
        "at start (checked against the database, caught up) instead of rebuilding it.",
    )
    snapshot_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="At most this often the index snapshot is written again while the service runs "
        "(also after a rebuild and at shutdown); searches wait while it is written.",
    )
    change_log_days: float = Field(
        default=7.0,
        ge=0,
        description="The change log's rows are kept this many days, then pruned (0: kept for ever). A "
        "replica or snapshot that is older than that rebuilds its index from the database at start.",
    )
    exact_search_max: int = Field(
        default=20_000,
        gt=0,
        description="A collection up to this many entries is searched exactly; past it, approximately "
        "(HNSW). A filter admitting up to this many entries is always scored exactly.",
    )
    vector_backend: Literal["faiss", "milvus"] = Field(
        default="faiss",
        description="Where the vectors are searched: 'faiss' (in this process, snapshots in "
        "<data_dir>/index) or 'milvus' (Milvus Lite or a Milvus server at milvus_uri; the [milvus] extra).",
    )
    milvus_uri: str | None = Field(
        default=None,
        description="With vector_backend=milvus: a file path (Milvus Lite, embedded, one process per file) "
        "or a server URL such as http://milvus:19530; default <data_dir>/milvus.db.",
    )
    milvus_token: SecretStr | None = Field(
        default=None,
        description="Milvus credentials ('user:password' or an API key) when the server requires them.",
    )
    reembed_batch_size: int = Field(
        default=64,
        gt=0,
        le=4096,
        description="Crops per batch (and per forward pass) when re-embedding; each batch is one "
        "transaction, so a killed run loses at most one.",
    )

    # Security
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys; when set, every endpoint but /healthz and /readyz "
        "needs a matching X-API-Key header.",
    )

    # Input limits
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="Per image file.")
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Whole request body, checked while it streams in."
    )
    max_pixels: int = Field(default=4096 * 4096, gt=0, description="Per decoded image (bomb guard).")
    max_images_per_request: int = Field(default=64, gt=0)
    max_top_k: int = Field(default=1000, gt=0, le=10_000)

    # Inference
    runtime: Literal["onnx", "torch"] | None = Field(
        default=None,
        description="What runs the networks: 'onnx' (ONNX Runtime, the bundle's verified graph) or "
        "'torch'; unset, empty or 'auto': ONNX Runtime for bundles with a graph on the CPU, else torch.",
    )
    device: str = Field(
        default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="Where the models run: cpu, cuda, cuda:N."
    )
    batch_size: int = Field(
        default=8,
        gt=0,
        description="Crops per forward pass within a request; with one torch thread large batches thrash "
        "the CPU cache, with many threads they keep the threads busy (docs/service.md has measurements).",
    )
    inference_workers: int = Field(
        default=2, gt=0, description="Requests running inference at the same time (threads)."
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        validation_alias=AliasChoices("intra_op_threads", "REID_INTRA_OP_THREADS", "REID_TORCH_THREADS"),
        description="Threads per forward pass; 0 = the runtime's default: all CPU cores for ONNX Runtime "
        "(one pool per session, shared by concurrent requests), cores // inference_workers for torch "
        "(its OpenMP threads thrash when oversubscribed). REID_TORCH_THREADS is the old name.",
    )
    faiss_threads: int = Field(
        default=1,
        ge=1,
        description="FAISS OpenMP threads per search; one query's scan is memory-bound, and a second "
        "OpenMP pool spinning next to torch's only contends for the cores.",
    )

    query_expansion: int | None = Field(
        default=None,
        ge=0,
        description="Query expansion: neighbours averaged into each query (alpha-QE); unset: what the "
        "re-ID bundle's manifest validated (off when it has no 'query_expansion' section); 0: off.",
    )

    gallery_side: bool = Field(
        default=True,
        description="Score the query's best candidates with their own neighbourhoods in the gallery "
        "(gallery-side augmentation, in the order and with the parameters the re-ID bundle's manifest "
        "validated: its 'query_expansion.gallery_side'); false: query expansion alone.",
    )

    # Server (``reid-serve --host/--port`` override these)
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)

    @field_validator("runtime", mode="before")
    @classmethod
    def _auto_runtime(cls, value: object) -> object:
        # docker-compose passes REID_RUNTIME through as an empty string when it is not set.
        if isinstance(value, str) and value.strip().lower() in ("", "auto"):
            return None
        return value

    @field_validator("query_expansion", mode="before")
    @classmethod
    def _unset_expansion(cls, value: object) -> object:
        # An empty REID_QUERY_EXPANSION (compose's ${VAR:-}) means unset: the bundle decides.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("milvus_uri", "milvus_token", mode="before")
    @classmethod
    def _unset_milvus(cls, value: object) -> object:
        # Empty means unset (compose's ${VAR:-}).
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("database_password_file", mode="before")
    @classmethod
    def _unset_password_file(cls, value: object) -> object:
        # Empty means unset (a .env line `REID_DATABASE_PASSWORD_FILE=`), not the current directory.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @model_validator(mode="after")
    def _defaults_from_dirs(self) -> Settings:
        if self.attribute_bundle is None:
            self.attribute_bundle = self.models_dir / "attributes"
        if self.reid_bundle is None:
            self.reid_bundle = self.models_dir / "reid"
        return self

    @model_validator(mode="after")
    def _password_from_file(self) -> Settings:
        # A file, not the environment: a password in REID_DATABASE_URL shows in `docker inspect`.
        if not (self.database_url and self.database_password_file):
            return self
        try:
            url = make_url(self.database_url)
        except (ArgumentError, ValueError):
            return self  # preflight names the bad URL
        if url.password is not None:
            return self
        try:
            password = self.database_password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read REID_DATABASE_PASSWORD_FILE: {exc}") from exc
        if not password:
            raise ValueError(f"REID_DATABASE_PASSWORD_FILE {self.database_password_file} is empty")
        self.database_url = url.set(password=password).render_as_string(hide_password=False)
        return self

    @property
    def attribute_bundle_dir(self) -> Path:
        assert self.attribute_bundle is not None
        return self.attribute_bundle

    @property
    def reid_bundle_dir(self) -> Path:
        assert self.reid_bundle is not None
        return self.reid_bundle

    @property
    def snapshot_dir(self) -> Path | None:
        """Where the index snapshots live (None: snapshots are off)."""
        return self.data_dir / "index" if self.index_snapshots else None

    @property
    def milvus(self) -> str:
        """The Milvus URI in use (Milvus Lite in ``data_dir`` unless ``milvus_uri`` is set)."""
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    @property
    def database(self) -> str:
        """The database URL in use (SQLite under ``data_dir`` unless ``database_url`` is set)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / SQLITE_FILE}"

    def resolved_threads(self, runtime: str = "onnx") -> int:
        """Intra-op threads per model on ``runtime`` (the setting, or that runtime's default).

        On 2 cores (reid bundle, 256x128): ONNX Runtime at 2 threads embeds one crop in 2.9 ms and 32 in
        59 ms, against 3.7 ms and 103 ms at 1 thread; two concurrent callers lose about 10% to it."""
        if self.intra_op_threads:
            return self.intra_op_threads
        cores = os.cpu_count() or 1
        return cores if runtime == "onnx" else max(1, cores // self.inference_workers)

    def key_bytes(self) -> list[bytes]:
        return [key.get_secret_value().encode() for key in self.api_keys]


def settings_or_exit(prog: str) -> Settings:
    """The settings from the environment, or exit with one line that names the bad variable."""
    try:
        return Settings()
    except Exception as exc:  # pydantic's message names the bad variable
        sys.exit(f"{prog}: invalid settings: {exc}".replace("\n", " "))
