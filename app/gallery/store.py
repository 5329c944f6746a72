"""The gallery's tables and every query on them (SQLAlchemy 2.0), as keyword-only functions.

The database is the truth: each entry keeps its embedding (float32 bytes), the version of the re-ID
bundle that made it, the image's sha256, the attributes and the metadata, and (unless
``REID_STORE_IMAGES=false``) the crop as uploaded. The FAISS index is derived from these rows and can
always be rebuilt from them. Embeddings and crops live in tables of their own, so the entry rows that
filters scan stay small (a 2560-d embedding is 10 kB, a crop a few kB).

Schema management: a new database gets ``create_all`` and its version written to ``reid_schema``;
an older one is brought up to date by the numbered steps in ``MIGRATIONS``, each in its own
transaction; a database newer than this build is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Select,
    String,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.schema import CreateTable

SCHEMA_VERSION = 4

# Where the API serves an entry's stored crop; entries and matches carry it so clients build no URLs.
IMAGE_URL = "/gallery/{}/image"

# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere ids are 64-bit like FAISS's.
EntryId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class Entry(Base):
    """One enrolled crop."""

    __tablename__ = "gallery_entries"

    id: Mapped[int] = mapped_column(EntryId, primary_key=True, autoincrement=True)
    collection: Mapped[str] = mapped_column(String(128))
    identity: Mapped[str | None] = mapped_column(String(256))
    camera_id: Mapped[str | None] = mapped_column(String(128))
    track_id: Mapped[str | None] = mapped_column(String(128))
    captured_at: Mapped[datetime | None] = mapped_column(DateTime())  # naive UTC
    extra: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    image_sha256: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))  # the re-ID bundle of the embedding
    attribute_model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime())
    attributes: Mapped[list[EntryAttribute]] = relationship(
        back_populates="entry", lazy="selectin", cascade="all, delete-orphan", passive_deletes=True
    )
    embedding: Mapped[Embedding] = relationship(
        lazy="raise", cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (
        UniqueConstraint("collection", "image_sha256", name="uq_gallery_entries_collection_sha256"),
        Index("ix_gallery_entries_collection_identity", "collection", "identity"),
        # Search filters always fix collection and model version: these two cover them with the id.
        Index("ix_gallery_entries_search_camera", "collection", "model_version", "camera_id"),
        Index("ix_gallery_entries_search_captured", "collection", "model_version", "captured_at"),
        # Covers the per-collection count and id sum of a version that a snapshot is checked against at
        # start (Gallery.verify): 13 ms at 100k entries on SQLite, against 51 ms with model_version alone.
        Index("ix_gallery_entries_version_collection", "model_version", "collection"),
        # An id is never handed out twice (SQLite would otherwise reuse the highest one after its
        # delete; PostgreSQL's sequence never does): clients and caches may hold on to ids.
        {"sqlite_autoincrement": True},
    )


class Embedding(Base):
    """An entry's embedding: L2-normalised float32 bytes from the entry's ``model_version``."""

    __tablename__ = "gallery_embeddings"

    entry_id: Mapped[int] = mapped_column(
        EntryId, ForeignKey("gallery_entries.id", ondelete="CASCADE"), primary_key=True
    )
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class EntryAttribute(Base):
    """One predicted attribute of an entry; a table of its own so filters use an index."""

    __tablename__ = "gallery_entry_attributes"

    entry_id: Mapped[int] = mapped_column(
        EntryId, ForeignKey("gallery_entries.id", ondelete="CASCADE"), primary_key=True
    )
    attribute: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    entry: Mapped[Entry] = relationship(back_populates="attributes")

    __table_args__ = (Index("ix_gallery_entry_attributes_value", "attribute", "value", "entry_id"),)


class StoredImage(Base):
    """The crop an entry was enrolled from, byte for byte as uploaded (after the decode check): what
    ``GET /gallery/{id}/image`` serves and what re-embedding with a new bundle reads."""

    __tablename__ = "gallery_images"

    entry_id: Mapped[int] = mapped_column(
        EntryId, ForeignKey("gallery_entries.id", ondelete="CASCADE"), primary_key=True
    )
    content_type: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Change(Base):
    """The change log: one row per entry added, removed or re-embedded, written in the transaction that
    made the change. Every replica on the database reads it from the position its index reflects
    (``changes_after``) to stay current; ids only grow, and commit in id order (``log_changes``)."""

    __tablename__ = "gallery_changes"

    id: Mapped[int] = mapped_column(EntryId, primary_key=True, autoincrement=True)
    entry_id: Mapped[int] = mapped_column(EntryId)  # no foreign key: a removed entry's row stays
    kind: Mapped[str] = mapped_column(String(16))  # 'added', 'removed', 'reembedded'
    created_at: Mapped[datetime] = mapped_column(DateTime())

    __table_args__ = ({"sqlite_autoincrement": True},)


class SchemaVersion(Base):
    __tablename__ = "reid_schema"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


def _stored_crops(conn: Connection) -> None:
    # v1 -> v2: the stored crops. Entries enrolled before keep no image (image_url null); enrolling the
    # same bytes again stores it, and re-embedding reports them as without a crop. And the index on
    # model_version alone becomes (model_version, collection), which the index sync's poll reads.
    StoredImage.__table__.create(conn)
    conn.execute(text("DROP INDEX ix_gallery_entries_model_version"))
    next(i for i in Entry.__table__.indexes if i.name == "ix_gallery_entries_version_collection").create(conn)


def _ids_never_reused(conn: Connection) -> None:
    # v2 -> v3: SQLite gives gallery_entries AUTOINCREMENT, which only a new table can have: made,
    # filled, the old one dropped (foreign keys are off during migrations, so nothing cascades), renamed,
    # its indexes made again; the id counter starts above the highest id. PostgreSQL: nothing to do.
    if conn.dialect.name != "sqlite":
        return
    table = Entry.__table__
    columns = ", ".join(c.name for c in table.columns)
    ddl = str(CreateTable(table).compile(dialect=conn.dialect))
    conn.exec_driver_sql(ddl.replace("CREATE TABLE gallery_entries", "CREATE TABLE gallery_entries_v3", 1))
    conn.exec_driver_sql(f"INSERT INTO gallery_entries_v3 ({columns}) SELECT {columns} FROM gallery_entries")
    conn.exec_driver_sql("DROP TABLE gallery_entries")
    conn.exec_driver_sql("ALTER TABLE gallery_entries_v3 RENAME TO gallery_entries")
    for index in table.indexes:
        index.create(conn)
    if conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
        raise SchemaError("rebuilding gallery_entries broke a foreign key; the migration was rolled back")


def _change_log(conn: Connection) -> None:
    # v3 -> v4: the change log that replicas follow. It starts empty: a replica's index of the rows
    # before it comes from a rebuild at its next start (no snapshot matches an older schema).
    Change.__table__.create(conn)


# version -> step that upgrades a database from version-1 to version.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _stored_crops,
    3: _ids_never_reused,
    4: _change_log,
}


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this build."""


def utc_naive(moment: datetime | None) -> datetime | None:
    """Store times as naive UTC (portable across SQLite and PostgreSQL); naive input means UTC."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def as_utc(moment: datetime | None) -> datetime | None:
    """A stored naive-UTC time as an aware one (what the API shows)."""
    return None if moment is None else moment.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------
# Engine and schema


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer and vice versa
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps it consistent
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets its folder created, WAL mode and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # A pooled connection is checked before use (one the server dropped is replaced), and a connect gives
    # up after 5 s, so requests fail fast (503) while the server is away and recover when it is back.
    connect_args = {"connect_timeout": 5} if parsed.get_driver_name() in ("psycopg", "psycopg2") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args)


def stored_schema_version(conn: Connection) -> int | None:
    """The database's schema version, None for a database without gallery tables (only reads).

    Raises ``SchemaError`` for a database this build cannot use: gallery tables without a version (or a
    version table without its row) and a version newer than this build's.
    """
    tables = set(inspect(conn).get_table_names())
    if SchemaVersion.__tablename__ not in tables:
        if Entry.__tablename__ in tables:
            raise SchemaError("gallery tables exist without a schema version; refusing to guess")
        return None
    current = conn.execute(select(func.max(SchemaVersion.version))).scalar_one()
    if current is None:  # the row is written with the tables; without it nothing says what they hold
        raise SchemaError(f"table {SchemaVersion.__tablename__} holds no version; refusing to guess")
    if current > SCHEMA_VERSION:
        raise SchemaError(f"database schema is version {current}; this build knows up to {SCHEMA_VERSION}")
    return current


def prepare_schema(engine: Engine) -> int:
    """Create a new schema or migrate an old one; returns the schema version now in place."""
    with engine.begin() as conn:
        current = stored_schema_version(conn)
        if current is None:
            Base.metadata.create_all(conn)
            conn.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION))
            return SCHEMA_VERSION
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with engine.connect() as conn, _migrating(conn):
            MIGRATIONS[version](conn)
            conn.execute(SchemaVersion.__table__.update().values(version=version))
    return SCHEMA_VERSION


@contextmanager
def _migrating(conn: Connection) -> Iterator[None]:
    """One transaction for a migration step. On SQLite with foreign keys off (a table rebuild's drop must
    not cascade to the rows that refer to it; the pragma only works outside a transaction) and an explicit
    BEGIN (pysqlite would run the DDL before the first write outside any transaction)."""
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        conn.commit()
    try:
        with conn.begin():
            if sqlite:
                conn.exec_driver_sql("BEGIN")
            yield
    finally:
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def drop_schema(engine: Engine) -> None:
    """Drop every gallery table (tests use it to start from an empty PostgreSQL database)."""
    Base.metadata.drop_all(engine)


# ---------------------------------------------------------------------------------------------------
# Writes


@dataclass
class NewEntry:
    """What enrollment hands to the store for one crop."""

    image_sha256: str
    embedding: np.ndarray
    attributes: dict[str, tuple[str, float]]
    identity: str | None = None
    camera_id: str | None = None
    track_id: str | None = None
    captured_at: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    image: bytes | None = None  # the crop to keep (None: REID_STORE_IMAGES is off)
    content_type: str = "application/octet-stream"


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _attribute_rows(attributes: dict[str, tuple[str, float]]) -> list[EntryAttribute]:
    return [EntryAttribute(attribute=k, value=v, score=s) for k, (v, s) in attributes.items()]


def add_entries(
    session: Session,
    *,
    collection: str,
    items: Sequence[NewEntry],
    model_version: str,
    attribute_model_version: str,
) -> tuple[list[int], datetime]:
    """Insert new entries with their embeddings and attributes in three multi-row statements (no ORM
    objects); returns their ids, in the order of ``items``, and the ``created_at`` they were given."""
    if not items:
        return [], datetime.now(UTC).replace(tzinfo=None)
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [
        {
            "collection": collection,
            "identity": item.identity,
            "camera_id": item.camera_id,
            "track_id": item.track_id,
            "captured_at": utc_naive(item.captured_at),
            "extra": item.metadata,
            "image_sha256": item.image_sha256,
            "model_version": model_version,
            "attribute_model_version": attribute_model_version,
            "created_at": now,
        }
        for item in items
    ]
    ids = list(session.scalars(insert(Entry).returning(Entry.id, sort_by_parameter_order=True), rows))
    pairs = list(zip(ids, items, strict=True))
    session.execute(
        insert(Embedding), [{"entry_id": i, "vector": _blob(item.embedding)} for i, item in pairs]
    )
    attributes = [
        {"entry_id": i, "attribute": name, "value": value, "score": score}
        for i, item in pairs
        for name, (value, score) in item.attributes.items()
    ]
    if attributes:
        session.execute(insert(EntryAttribute), attributes)
    add_images(
        session, images={i: (item.content_type, item.image) for i, item in pairs if item.image is not None}
    )
    return ids, now


def add_images(session: Session, *, images: dict[int, tuple[str, bytes]]) -> None:
    """Store crops: {entry id: (content type, bytes)}."""
    if images:
        rows = [{"entry_id": i, "content_type": t, "data": d} for i, (t, d) in images.items()]
        session.execute(insert(StoredImage), rows)


def refresh_entry(
    session: Session, *, entry: Entry, item: NewEntry, model_version: str, attribute_model_version: str
) -> Entry:
    """Re-embed an entry made by another bundle (same image enrolled again); its fields are kept."""
    row = session.get(Embedding, entry.id)
    if row is None:
        session.add(Embedding(entry_id=entry.id, vector=_blob(item.embedding)))
    else:
        row.vector = _blob(item.embedding)
    entry.model_version = model_version
    entry.attribute_model_version = attribute_model_version
    entry.attributes = _attribute_rows(item.attributes)
    return entry


def delete_entries(session: Session, *, ids: Sequence[int]) -> None:
    if ids:
        session.execute(delete(EntryAttribute).where(EntryAttribute.entry_id.in_(ids)))
        session.execute(delete(Embedding).where(Embedding.entry_id.in_(ids)))
        session.execute(delete(StoredImage).where(StoredImage.entry_id.in_(ids)))
        session.execute(delete(Entry).where(Entry.id.in_(ids)))


# ---------------------------------------------------------------------------------------------------
# Reads


def entries_by_sha(session: Session, *, collection: str, digests: Sequence[str]) -> dict[str, Entry]:
    if not digests:
        return {}
    rows = session.scalars(
        select(Entry).where(Entry.collection == collection, Entry.image_sha256.in_(list(digests)))
    )
    return {e.image_sha256: e for e in rows}


def get_entry(session: Session, *, entry_id: int) -> Entry | None:
    return session.get(Entry, entry_id)


def get_image(session: Session, *, entry_id: int) -> tuple[str, bytes, str] | None:
    """(content type, bytes, their sha256) of the entry's stored crop, or None."""
    query = (
        select(StoredImage.content_type, StoredImage.data, Entry.image_sha256)
        .join(Entry, Entry.id == StoredImage.entry_id)
        .where(StoredImage.entry_id == entry_id)
    )
    row = session.execute(query).first()
    return None if row is None else (row[0], row[1], row[2])


def with_image(session: Session, *, ids: Sequence[int]) -> set[int]:
    """Which of ``ids`` have a stored crop."""
    if not ids:
        return set()
    query = select(StoredImage.entry_id).where(StoredImage.entry_id.in_(list(ids)))
    return set(session.scalars(query))


def image_url(entry_id: int, stored: bool) -> str | None:
    return IMAGE_URL.format(entry_id) if stored else None


@functools.cache
def _match_query(dialect: str) -> Select:
    """The entries of the bound ``ids`` with their attributes folded into one JSON object
    {attribute: {value, score}} by the database; built once per dialect (statement construction and
    its cache key cost more than the query itself at top_k=10)."""
    a, e = EntryAttribute, Entry
    if dialect == "postgresql":
        pair = func.json_build_object("value", a.value, "score", a.score)
        folded = func.json_object_agg(a.attribute, pair, type_=JSON)
    else:  # SQLite's JSON1 functions
        pair = func.json_object("value", a.value, "score", a.score)
        folded = func.json_group_object(a.attribute, pair, type_=JSON)
    attributes = select(folded).where(a.entry_id == e.id).correlate(e).scalar_subquery()
    stored = select(StoredImage.entry_id).where(StoredImage.entry_id == e.id).correlate(e).exists()
    return select(
        e.id, e.identity, e.collection, e.camera_id, e.track_id, e.captured_at, e.extra, attributes, stored
    ).where(e.id.in_(bindparam("ids", expanding=True)))


def match_rows(session: Session, *, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The entries ``ids`` with their attributes as plain dicts (the fields of a match), keyed by id.

    One SQL round trip and no ORM objects: a query asking for hundreds of matches spends its time in
    the database's C code rather than in per-row Python.
    """
    if not ids:
        return {}
    connection = session.connection()
    query = _match_query(connection.dialect.name)
    rows = {}
    result = connection.execute(query, {"ids": list(ids)})
    for entry_id, identity, collection, camera, track, captured, extra, attributes, stored in result:
        rows[entry_id] = {
            "entry_id": entry_id,
            "identity": identity,
            "collection": collection,
            "camera_id": camera,
            "track_id": track,
            "captured_at": as_utc(captured),
            "metadata": extra or {},
            "attributes": attributes or {},
            "image_url": image_url(entry_id, bool(stored)),
        }
    return rows


@dataclass(frozen=True)
class EntryRecord:
    """An entry as plain values, the fields of the API's ``GalleryEntry``: times aware UTC, attributes
    {group: {value, score}}, no embedding. Built inside the session, it can be used after it closes."""

    id: int
    collection: str
    identity: str | None
    camera_id: str | None
    track_id: str | None
    captured_at: datetime | None
    metadata: dict[str, Any]
    attributes: dict[str, dict[str, Any]]
    image_sha256: str
    model_version: str
    searchable: bool  # made by the loaded re-ID bundle, so in the index
    created_at: datetime
    image_url: str | None  # where the stored crop is served; None when none is kept


def entry_record(entry: Entry, *, model_version: str, has_image: bool) -> EntryRecord:
    """``entry`` as plain values; ``model_version`` is the loaded re-ID bundle's (searchable entries),
    ``has_image`` whether its crop is stored (``with_image``)."""
    return EntryRecord(
        id=entry.id,
        collection=entry.collection,
        identity=entry.identity,
        camera_id=entry.camera_id,
        track_id=entry.track_id,
        captured_at=as_utc(entry.captured_at),
        metadata=entry.extra or {},
        attributes={a.attribute: {"value": a.value, "score": a.score} for a in entry.attributes},
        image_sha256=entry.image_sha256,
        model_version=entry.model_version,
        searchable=entry.model_version == model_version,
        created_at=entry.created_at.replace(tzinfo=UTC),
        image_url=image_url(entry.id, has_image),
    )


def identity_entry_ids(session: Session, *, collection: str, identity: str) -> list[int]:
    query = select(Entry.id).where(Entry.collection == collection, Entry.identity == identity)
    return list(session.scalars(query))


def list_entries(
    session: Session,
    *,
    collection: str | None = None,
    identity: str | None = None,
    camera_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Entry], int]:
    """One page of entries in id order, and how many match in all."""
    conditions = []
    if collection is not None:
        conditions.append(Entry.collection == collection)
    if identity is not None:
        conditions.append(Entry.identity == identity)
    if camera_id is not None:
        conditions.append(Entry.camera_id == camera_id)
    total = session.scalar(select(func.count()).select_from(Entry).where(*conditions)) or 0
    page = session.scalars(select(Entry).where(*conditions).order_by(Entry.id).limit(limit).offset(offset))
    return list(page), total


@dataclass(frozen=True)
class SearchFilters:
    """Conditions a match must meet; attribute values OR within a group, AND across groups."""

    cameras: tuple[str, ...] = ()
    exclude_cameras: tuple[str, ...] = ()
    captured_after: datetime | None = None  # inclusive
    captured_before: datetime | None = None  # inclusive
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (
            self.cameras
            or self.exclude_cameras
            or self.captured_after
            or self.captured_before
            or self.attributes
        )


def matching_ids(
    session: Session, *, collection: str, model_version: str, filters: SearchFilters
) -> np.ndarray:
    """Ids of the searchable entries of ``collection`` that meet ``filters`` (int64 array)."""
    query = select(Entry.id).where(Entry.collection == collection, Entry.model_version == model_version)
    if filters.cameras:
        query = query.where(Entry.camera_id.in_(filters.cameras))
    if filters.exclude_cameras:
        query = query.where(or_(Entry.camera_id.is_(None), Entry.camera_id.not_in(filters.exclude_cameras)))
    if filters.captured_after is not None:
        query = query.where(Entry.captured_at >= utc_naive(filters.captured_after))
    if filters.captured_before is not None:
        query = query.where(Entry.captured_at <= utc_naive(filters.captured_before))
    for attribute, values in filters.attributes.items():
        having = select(EntryAttribute.entry_id).where(
            EntryAttribute.attribute == attribute, EntryAttribute.value.in_(values)
        )
        query = query.where(Entry.id.in_(having))
    return np.fromiter(session.scalars(query), dtype=np.int64)


@dataclass(frozen=True)
class IndexRows:
    """What the index holds of some entries: ids, collections, vectors, and the fields it filters on."""

    ids: np.ndarray
    collections: list[str]
    vectors: np.ndarray
    cameras: list[str | None]
    times: list[datetime | None]  # captured_at, naive UTC


def iter_embeddings(
    session: Session, *, model_version: str, dim: int, chunk: int = 10_000
) -> Iterator[IndexRows]:
    """The index's rows of every entry made by ``model_version``, ``chunk`` rows at a time."""
    query = (
        select(Entry.id, Entry.collection, Embedding.vector, Entry.camera_id, Entry.captured_at)
        .join(Embedding, Embedding.entry_id == Entry.id)
        .where(Entry.model_version == model_version)
        .order_by(Entry.id)
        .execution_options(yield_per=chunk)
    )
    for rows in session.execute(query).partitions(chunk):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[2] for r in rows)
        vectors = np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim)
        yield IndexRows(ids, [r[1] for r in rows], vectors, [r[3] for r in rows], [r[4] for r in rows])


def counts(session: Session) -> list[tuple[str, str, int]]:
    """(collection, model_version, entries) for every pair present."""
    query = select(Entry.collection, Entry.model_version, func.count()).group_by(
        Entry.collection, Entry.model_version
    )
    return [(c, v, n) for c, v, n in session.execute(query)]


def stored_image_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(StoredImage)) or 0


# ---------------------------------------------------------------------------------------------------
# Re-embedding (app.gallery.reembed) and catching the index up with other processes' writes


def _outdated(model_version: str, attribute_model_version: str):
    return or_(Entry.model_version != model_version, Entry.attribute_model_version != attribute_model_version)


def count_outdated(session: Session, *, model_version: str, attribute_model_version: str) -> tuple[int, int]:
    """(entries made by another re-ID or attribute bundle, how many of them have no stored crop)."""
    outdated = _outdated(model_version, attribute_model_version)
    total = session.scalar(select(func.count()).select_from(Entry).where(outdated)) or 0
    stored = select(StoredImage.entry_id).where(StoredImage.entry_id == Entry.id).exists()
    missing = session.scalar(select(func.count()).select_from(Entry).where(outdated, ~stored)) or 0
    return total, missing


@dataclass(frozen=True)
class OutdatedRow:
    """An entry to bring up to date, as read: what made it, and its stored crop (None if none)."""

    id: int
    collection: str
    model_version: str
    attribute_model_version: str
    content_type: str | None
    data: bytes | None


def outdated_rows(
    session: Session, *, model_version: str, attribute_model_version: str, after_id: int, limit: int
) -> list[OutdatedRow]:
    """The next ``limit`` outdated entries with ids above ``after_id``, in id order (a cursor: a run
    visits each entry once, and a new run starts again from the first one still outdated)."""
    query = (
        select(
            Entry.id,
            Entry.collection,
            Entry.model_version,
            Entry.attribute_model_version,
            StoredImage.content_type,
            StoredImage.data,
        )
        .outerjoin(StoredImage, StoredImage.entry_id == Entry.id)
        .where(_outdated(model_version, attribute_model_version), Entry.id > after_id)
        .order_by(Entry.id)
        .limit(limit)
    )
    return [OutdatedRow(*row) for row in session.execute(query)]


@dataclass(frozen=True)
class Reembedded:
    """New values for an entry read as ``seen``: an embedding (None: keep it) and attributes (None: keep)."""

    seen: OutdatedRow
    embedding: np.ndarray | None
    attributes: dict[str, tuple[str, float]] | None


def write_reembedded(
    session: Session, *, items: Sequence[Reembedded], model_version: str, attribute_model_version: str
) -> list[Reembedded]:
    """Apply ``items`` to the entries still as they were read; returns the ones applied.

    The version check in the UPDATE makes this safe next to any other writer: an entry deleted,
    re-enrolled or re-embedded by another process since it was read is left alone, never written twice.
    """
    by_seen: dict[tuple[str, str], list[Reembedded]] = {}
    for item in items:
        key = (item.seen.model_version, item.seen.attribute_model_version)
        by_seen.setdefault(key, []).append(item)
    applied: list[Reembedded] = []
    for (seen_version, seen_attribute_version), group in by_seen.items():
        query = (
            update(Entry)
            .where(
                Entry.id.in_([item.seen.id for item in group]),
                Entry.model_version == seen_version,
                Entry.attribute_model_version == seen_attribute_version,
            )
            .values(model_version=model_version, attribute_model_version=attribute_model_version)
            .returning(Entry.id)
        )
        ids = set(session.scalars(query))
        applied.extend(item for item in group if item.seen.id in ids)
    vectors = [item for item in applied if item.embedding is not None]
    if vectors:
        session.execute(delete(Embedding).where(Embedding.entry_id.in_([item.seen.id for item in vectors])))
        session.execute(
            insert(Embedding),
            [{"entry_id": item.seen.id, "vector": _blob(item.embedding)} for item in vectors],
        )
    described = [item for item in applied if item.attributes is not None]
    if described:
        ids = [item.seen.id for item in described]
        session.execute(delete(EntryAttribute).where(EntryAttribute.entry_id.in_(ids)))
        rows = [
            {"entry_id": item.seen.id, "attribute": name, "value": value, "score": score}
            for item in described
            for name, (value, score) in (item.attributes or {}).items()
        ]
        if rows:
            session.execute(insert(EntryAttribute), rows)
    return applied


def searchable_fingerprints(session: Session, *, model_version: str) -> dict[str, tuple[int, int]]:
    """{collection: (entries made by ``model_version``, sum of their ids)}: one aggregate query that
    tells whether an index holds exactly these rows without reading them."""
    query = (
        select(Entry.collection, func.count(), func.sum(Entry.id))
        .where(Entry.model_version == model_version)
        .group_by(Entry.collection)
    )
    return {c: (int(n), int(total or 0)) for c, n, total in session.execute(query)}


def searchable_ids(session: Session, *, collection: str, model_version: str) -> np.ndarray:
    query = select(Entry.id).where(Entry.collection == collection, Entry.model_version == model_version)
    return np.fromiter(session.scalars(query), dtype=np.int64)


def embeddings_of(
    session: Session, *, ids: Sequence[int], model_version: str, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of those of ``ids`` that are made by ``model_version`` (others are skipped)."""
    query = (
        select(Entry.id, Embedding.vector)
        .join(Embedding, Embedding.entry_id == Entry.id)
        .where(Entry.id.in_(list(ids)), Entry.model_version == model_version)
    )
    rows = session.execute(query).all()
    found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return found, vectors


# ---------------------------------------------------------------------------------------------------
# The change log (replicas and index snapshots follow it)

# Held by the transaction that appends to the log, until it commits: log ids are taken and committed in
# the same order, so a reader that has seen id n has seen every id below it. (SQLite has one writer.)
_LOG_LOCK = 0x72656964  # 'reid'


def log_changes(session: Session, *, entry_ids: Sequence[int], kind: str) -> list[int]:
    """Append one change per entry to the log, in the caller's transaction; returns the log ids. Call it
    last in the transaction: on PostgreSQL it serialises the writers from here to their commit."""
    if not entry_ids:
        return []
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOG_LOCK})
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = [{"entry_id": int(i), "kind": kind, "created_at": now} for i in entry_ids]
    return list(session.scalars(insert(Change).returning(Change.id, sort_by_parameter_order=True), rows))


def change_position(session: Session) -> int:
    """The id of the last change committed (0 for an empty log)."""
    return int(session.scalar(select(func.max(Change.id))) or 0)


def pruned_after(session: Session, *, position: int) -> bool:
    """Whether changes after ``position`` may have been pruned from the log (``prune_changes``): the
    next one it holds is not ``position + 1`` and none at or before ``position`` survives. Ids skipped
    by transactions that rolled back read as pruned then: a needless rebuild, never a missed change."""
    following = session.scalar(select(func.min(Change.id)).where(Change.id > position))
    if following is None or following == position + 1:
        return False
    return int(session.scalar(select(func.min(Change.id))) or 0) > position


def prune_changes(session: Session, *, before: datetime, limit: int = 50_000) -> int:
    """Delete up to ``limit`` changes logged before ``before``, oldest first, in the caller's
    transaction; returns how many. The last change always stays: it is the position every replica and
    snapshot compares with (``change_position``)."""
    last = change_position(session)
    doomed = (
        select(Change.id)
        .where(Change.created_at < before, Change.id < last)
        .order_by(Change.id)
        .limit(limit)
        .scalar_subquery()
    )
    return int(session.execute(delete(Change).where(Change.id.in_(doomed))).rowcount or 0)


def changes_after(session: Session, *, position: int, limit: int) -> list[tuple[int, int]]:
    """(log id, entry id) of the next ``limit`` changes after ``position``, in log order."""
    query = select(Change.id, Change.entry_id).where(Change.id > position).order_by(Change.id).limit(limit)
    return [(int(i), int(e)) for i, e in session.execute(query)]


def current_embeddings(session: Session, *, ids: Sequence[int], model_version: str, dim: int) -> IndexRows:
    """The index's rows of those of ``ids`` that exist and are made by ``model_version``."""
    query = (
        select(Entry.id, Entry.collection, Embedding.vector, Entry.camera_id, Entry.captured_at)
        .join(Embedding, Embedding.entry_id == Entry.id)
        .where(Entry.id.in_(list(ids)), Entry.model_version == model_version)
    )
    rows = session.execute(query).all()
    found = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return IndexRows(found, [r[1] for r in rows], vectors, [r[3] for r in rows], [r[4] for r in rows])


def filter_fields(session: Session, *, ids: Sequence[int]) -> dict[int, tuple[str | None, datetime | None]]:
    """{id: (camera_id, captured_at)}: the fields the index filters on, of entries it is given anew."""
    if not ids:
        return {}
    query = select(Entry.id, Entry.camera_id, Entry.captured_at).where(Entry.id.in_(list(ids)))
    return {i: (camera, captured) for i, camera, captured in session.execute(query)}
