"""The Ray Data pipeline: manifest records in, fixed-shape crops and token ids out.

Stages (one Ray Data task per block, on CPU nodes; the training split may run on an actor pool instead,
``preprocess_pool``)::

    manifest rows (this rank's share, from the caller)       from_items, blocks of rows_per_block rows
      -> validate + tokenize (processor.encode)               map_batches  }
      -> fetch image bytes (threads, s3fs / local)            map_batches  } same resources: fused by
      -> decode + crops (dragonfly.zoom.make_crops)           map_batches  } Ray Data into one task (or actor call)
      -> consumer in the train worker: drop + log bad rows, collate (pad to the batch's longest)

Validation comes first so that malformed or too-long records never cost image I/O. A record that
cannot become a sample does not raise inside Ray: its row carries ``bad_reason`` / ``bad_message``
and flows to the consumer, which owns the rank's bad-records file (the map tasks run in other
processes, on other nodes). The only errors that stop the pipeline are the ones no skipping can
fix: an unreachable object store and ``max_bad_fraction`` crossed.

Exact resume: the rows of an epoch are a seeded permutation of the manifest; global position ``p``
goes to rank ``p % world_size``; a rank keeps its rows from local index ``start`` on (a metadata
filter before any I/O) and the dataset runs with ``preserve_order``, so the consumer sees them in
local-index order and ``last local_index + 1`` is the exact position to resume from.

Row schema (pyarrow)::

    id: string, local_index: int64, source: string, has_image: bool,
    input_ids: list<int32>, labels: list<int32>,
    pixels: large_binary   # exactly n_tiles*R*R*3 bytes (uint8 (n_tiles, R, R, 3), C order: the crop
                           # engine's channels-last tiles) for image rows, 0 bytes for text-only and bad rows
    bad_reason: string (null when good), bad_message: string

Pixels travel as a fixed-length binary field rather than a tensor column: every image row has the
same size (13.9 MB at R=336, 41 crops), text-only rows cost nothing, the crop task writes a block's
crops into one buffer that becomes the column, and the consumer views the bytes as the array: the
only copies of a sample's pixels are the crop engine's write and the object store's (and the batch
collation's, for a batch whose images span two blocks: ``dragonfly.zoom.stack_crops``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dragonfly.config import ZoomConfig
from dragonfly_platform.manifest import ManifestRecord, read_manifest
from dragonfly_platform.storage import RECORD_READ_ERRORS, StorageConfig, join, parent, read_error_reason

if TYPE_CHECKING:
    # Imported where used: the consumer side needs no transformers until it collates.
    from dragonfly.processor import DragonflyProcessor

Split = Literal["train", "val"]

# A rank's rows as they enter the pipeline: ManifestRecord.to_row() and where the row comes from.
INPUT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("conversations_json", pa.string()),
        ("line", pa.int64()),
        ("local_index", pa.int64()),
        ("manifest", pa.string()),
    ]
)
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("local_index", pa.int64()),
        ("source", pa.string()),
        ("has_image", pa.bool_()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("pixels", pa.large_binary()),
        ("bad_reason", pa.string()),
        ("bad_message", pa.string()),
    ]
)


class TooManyBadRecords(RuntimeError):
    """More than ``max_bad_fraction`` of the records seen were bad."""


class DataConfig(BaseModel):
    """Where the data is and how the pipeline runs. Composed into the training run config."""

    model_config = ConfigDict(extra="forbid")

    train_manifest: str
    val_manifest: str | None = None
    # Folder or s3:// prefix the manifests' image paths are relative to; None: the manifest's folder.
    image_root: str | None = None
    storage: StorageConfig = Field(default_factory=StorageConfig)

    # Placement of the preprocessing tasks (tokenize, fetch, crop: the CPU-heavy work). On a cluster
    # with CPU and GPU node groups, give CPU nodes a custom resource (``ray start
    # --resources='{"cpu_preprocess": 1000}'``) and set ``preprocess_resources: {cpu_preprocess:
    # 0.001}``, or label them (``ray start --labels=dragonfly/node-role=cpu``) and set
    # ``preprocess_label_selector``. Unset (local runs): anywhere.
    preprocess_resources: dict[str, float] = Field(default_factory=dict)
    preprocess_label_selector: dict[str, str] | None = None
    preprocess_num_cpus: Annotated[float, Field(gt=0)] = 1.0  # per preprocessing task or actor
    # How the training split's preprocessing runs (docs/data.md). "tasks": a Ray task per block, on
    # worker processes Ray keeps warm across datasets; a core waits between tasks while Ray Data
    # notices a finished one and schedules the next (~110-150 ms per ~170 ms task on 2 cores).
    # "actors": a fixed pool of preprocess_concurrency long-lived actors per rank, each sent
    # preprocess_blocks_per_actor blocks ahead, so it starts the next block the moment it finishes
    # one. Faster once running (2 cores, session 12: 65-73 samples/s after the first batch against
    # ~46), but a pool starts anew each epoch (~5 s later to its first batch on 2 busy cores) and
    # holds its CPUs until the epoch ends. Validation always runs on tasks: it is short,
    # and it runs mid-epoch, while the training pools keep their CPUs.
    preprocess_pool: Literal["tasks", "actors"] = "tasks"
    preprocess_blocks_per_actor: Annotated[int, Field(gt=0)] = 2
    # Max concurrent preprocessing tasks (None: as many as fit), or the actor pool's size (required:
    # in the benchmark a pool free to grow ran at half the rate of a fixed one).
    preprocess_concurrency: Annotated[int, Field(gt=0)] | None = None
    fetch_threads: Annotated[int, Field(gt=0)] = 16  # concurrent image reads per task

    # Rows per preprocessing task, i.e. per output block: 8 rows of 13.9 MB (111 MB) stay under Ray
    # Data's 128 MiB block target, so the object store holds a few blocks, not whole shards. Fewer,
    # larger tasks cost less per sample (2 cores, session 4: 4 rows 42%, 8 rows 52% of the crop
    # engine's rate).
    rows_per_block: Annotated[int, Field(gt=0)] = 8
    prefetch_batches: Annotated[int, Field(ge=0)] = 2

    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    # The fraction is only judged after this many records (or at the end of the stream).
    min_records_for_bad_fraction: Annotated[int, Field(ge=0)] = 100
    shuffle_seed: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _actor_pool_has_a_size(self) -> DataConfig:
        if self.preprocess_pool == "actors" and self.preprocess_concurrency is None:
            raise ValueError(
                "preprocess_pool 'actors' needs preprocess_concurrency, the pool's size per rank"
            )
        return self

    def uses_actor_pool(self, split: Split) -> bool:
        return self.preprocess_pool == "actors" and split == "train"

    def manifest(self, split: Split) -> str:
        path = self.train_manifest if split == "train" else self.val_manifest
        if path is None:
            raise ValueError(f"data config has no {split}_manifest")
        return path

    def image_root_for(self, manifest_path: str) -> str:
        return self.image_root if self.image_root is not None else parent(manifest_path)


# ---------------------------------------------------------------------------------------------
# Which rows a rank gets


def unoffered_preprocess_resources(data_cfg: DataConfig, cluster_resources: dict[str, float]) -> list[str]:
    """The custom resources of ``data_cfg.preprocess_resources`` that no node of the cluster has."""
    return sorted(name for name in data_cfg.preprocess_resources if cluster_resources.get(name, 0) <= 0)


def actor_pool_cpus(data_cfg: DataConfig, n_ranks: int) -> float:
    """CPUs that ``n_ranks`` ranks' training actor pools hold at once (0 with tasks). A pool keeps
    its CPUs for its epoch, so ranks whose pools cannot all start wait on each other at their first
    collective, with no error of their own."""
    if not data_cfg.uses_actor_pool("train"):
        return 0.0
    return n_ranks * data_cfg.preprocess_concurrency * data_cfg.preprocess_num_cpus


def rank_indices(n_records: int, *, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool = True):
    """Manifest indices of ``rank``'s rows for ``epoch``, in the order it consumes them.

    A seeded permutation per (seed, epoch); global position ``p`` goes to rank ``p % world_size``, so
    the ranks partition the records and their sizes differ by at most one.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n_records) if shuffle else np.arange(n_records)
    return order[rank::world_size]


@lru_cache(maxsize=4)
def _cached_manifest(path: str, storage: StorageConfig) -> tuple[ManifestRecord, ...]:
    # Each epoch rebuilds the rank's dataset; the manifest is read once per worker process.
    return tuple(read_manifest(path, storage))


def build_rank_dataset(
    data_cfg: DataConfig,
    processor: DragonflyProcessor | str | os.PathLike,
    split: Split,
    *,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int | None = None,
    start: int = 0,
    shuffle: bool = True,
    processor_key: str | None = None,
):
    """This rank's rows of ``split`` for ``epoch`` from local index ``start`` on, as a Ray Dataset.

    Returns ``(dataset, n_rows)``: ``n_rows`` is the rank's row count for the whole epoch (bad
    records included, ``start`` not subtracted), what a progress bar or LR schedule needs. Call it
    inside the train worker; iterate the dataset with ``iter_train_batches``.

    ``processor_key`` names the processor wherever it is loaded (training passes the run's processor
    folder): preprocessing workers keep a few processors by key, so the ranks, epochs and splits
    of a run unpickle theirs once per worker process. Default: a key of this call's own.
    """
    import ray.data

    if isinstance(processor, str | os.PathLike):
        from dragonfly.processor import DragonflyProcessor

        processor = DragonflyProcessor.from_pretrained(processor)
    manifest_path = data_cfg.manifest(split)
    records = _cached_manifest(manifest_path, data_cfg.storage)
    seed = data_cfg.shuffle_seed if seed is None else seed
    indices = rank_indices(
        len(records), rank=rank, world_size=world_size, epoch=epoch, seed=seed, shuffle=shuffle
    )
    if start < 0 or start > len(indices):
        raise ValueError(f"start {start} is outside this rank's {len(indices)} rows")

    root = data_cfg.image_root_for(manifest_path)
    rows = [
        {**records[i].to_row(), "local_index": local, "manifest": manifest_path}
        for local, i in enumerate(indices[start:].tolist(), start=start)
    ]
    if not rows:  # resumed at the very end of the epoch
        return ray.data.from_arrow(ROW_SCHEMA.empty_table()), len(indices)

    placement: dict[str, Any] = {}
    if data_cfg.preprocess_resources:
        placement["resources"] = dict(data_cfg.preprocess_resources)
    if data_cfg.preprocess_label_selector:
        placement["label_selector"] = dict(data_cfg.preprocess_label_selector)

    # One task per block of rows_per_block rows tokenizes, fetches and crops it: the three stages ask
    # for the same resources, so Ray Data fuses them, and the image bytes never cross the object
    # store. As separate operators, Ray Data's per-operator CPU reservation starved the crop stage
    # while the stages in front of it were still running (see docs/data.md). A block's images are
    # read concurrently (fetch_threads) before its first crop. Blocks are cut here, exactly: Ray
    # Data would merge uneven ones (from_items spreads rows evenly) into larger tasks and blocks.
    k = data_cfg.rows_per_block
    ds = ray.data.from_arrow(
        [pa.Table.from_pylist(rows[i : i + k], schema=INPUT_SCHEMA) for i in range(0, len(rows), k)]
    )
    processor_key = processor_key or uuid.uuid4().hex
    per_block = {
        "batch_size": data_cfg.rows_per_block,
        "batch_format": "pyarrow",
        "num_cpus": data_cfg.preprocess_num_cpus,
        **placement,
    }
    tasks = ray.data.TaskPoolStrategy(size=data_cfg.preprocess_concurrency)
    ds = ds.map_batches(
        tokenize_rows,
        fn_kwargs={"processor_ref": ray.put(processor), "processor_key": processor_key, "image_root": root},
        compute=tasks,
        **per_block,
    )
    ds = ds.map_batches(
        fetch_images,
        fn_kwargs={"storage": data_cfg.storage, "threads": data_cfg.fetch_threads},
        compute=tasks,
        **per_block,
    )
    crop, compute = make_crop_rows, tasks
    if data_cfg.uses_actor_pool(split):
        # Ray Data fuses the task stages in front into the actor stage: all three run in the pool.
        crop = CropRows
        compute = ray.data.ActorPoolStrategy(
            size=data_cfg.preprocess_concurrency,
            max_tasks_in_flight_per_actor=data_cfg.preprocess_blocks_per_actor,
        )
    ds = ds.map_batches(crop, fn_kwargs={"zoom": processor.zoom}, compute=compute, **per_block)
    # Local-index order out of the stream is what makes "last index + 1" an exact resume point.
    ds.context.execution_options.preserve_order = True
    return ds, len(indices)


def build_dataset(
    data_cfg: DataConfig,
    processor: DragonflyProcessor | str | os.PathLike,
    split: Split,
    *,
    shuffle: bool = False,
):
    """The whole split as one dataset in manifest order (evaluation, batch inference, benchmarks):
    ``build_rank_dataset`` with one rank."""
    return build_rank_dataset(data_cfg, processor, split, rank=0, world_size=1, shuffle=shuffle)


# ---------------------------------------------------------------------------------------------
# Stages (run in Ray workers)


_PROCESSORS: OrderedDict[str, DragonflyProcessor] = OrderedDict()
_PROCESSORS_KEPT = 4  # a few runs (sweep trials) sharing the preprocessing workers


def _processor(ref, key: str) -> DragonflyProcessor:
    """The processor named ``key``, unpickled once per worker process rather than once per task:
    Ray hands a worker tasks of every rank, epoch and split, and a real tokenizer (Llama-3's 128k
    vocabulary) takes ~1 s to unpickle, against ~0.3 s of cropping for a block."""
    if key in _PROCESSORS:
        _PROCESSORS.move_to_end(key)
    else:
        import ray

        _PROCESSORS[key] = ray.get(ref)
        while len(_PROCESSORS) > _PROCESSORS_KEPT:
            _PROCESSORS.popitem(last=False)
    return _PROCESSORS[key]


def tokenize_rows(batch: pa.Table, *, processor_ref, processor_key: str, image_root: str) -> pa.Table:
    """Validate each conversation and tokenize it; a ``RecordError`` makes the row bad with its reason."""
    from dragonfly.processor import RecordError

    processor = _processor(processor_ref, processor_key)
    out: dict[str, list] = {name: [] for name in ROW_SCHEMA.names}
    for row in batch.to_pylist():
        has_image = row["image"] is not None
        source = join(image_root, row["image"]) if has_image else f"{row['manifest']}:{row['line']}"
        input_ids = labels = np.zeros(0, np.int32)
        reason = message = None
        try:
            encoded = processor.encode(json.loads(row["conversations_json"]), has_image, record_id=row["id"])
            input_ids, labels = encoded["input_ids"], encoded["labels"]
        except RecordError as err:
            reason, message = err.reason, str(err)
        _append(out, row, source, has_image, input_ids, labels, b"", reason, message)
    return pa.Table.from_pydict(out, schema=ROW_SCHEMA)


def fetch_images(batch: pa.Table, *, storage: StorageConfig, threads: int) -> pa.Table:
    """Add ``image_bytes`` for the good image rows, reading them concurrently. A missing object
    makes the row bad (``missing_file``, ``unreadable_file``); an unreachable store raises."""
    rows = batch.to_pylist()
    wanted = [i for i, r in enumerate(rows) if r["has_image"] and r["bad_reason"] is None]
    data: list[bytes | None] = [None] * len(rows)

    def read(i: int) -> None:
        try:
            data[i] = storage.read_bytes(rows[i]["source"])
        except RECORD_READ_ERRORS as err:
            rows[i]["bad_reason"] = read_error_reason(err)
            rows[i]["bad_message"] = f"record {rows[i]['id']}: {type(err).__name__}: {rows[i]['source']}"

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(wanted)))) as pool:
        list(pool.map(read, wanted))  # list(): re-raise StorageUnavailableError here
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    return table.append_column("image_bytes", pa.array(data, type=pa.large_binary()))


class CropRows:
    """``make_crop_rows`` as the callable class Ray Data runs on an actor pool."""

    def __call__(self, batch: pa.Table, *, zoom: ZoomConfig) -> pa.Table:
        return make_crop_rows(batch, zoom=zoom)


def make_crop_rows(batch: pa.Table, *, zoom: ZoomConfig) -> pa.Table:
    """Decode each fetched image and make its crops; undecodable or oversized images become bad rows
    with the crop engine's reason (``truncated``, ``not_an_image``, ``too_many_pixels``, ...).

    The crop engine writes every sample's tiles straight into one buffer for the block, which
    becomes the ``pixels`` column without a copy.
    """
    from dragonfly.zoom import ImageError, make_crops

    _keep_freed_memory()
    image_bytes = batch.column("image_bytes").to_pylist()
    rows = batch.drop_columns(["image_bytes"]).to_pylist()
    wanted = [i for i, data in enumerate(image_bytes) if data is not None and rows[i]["bad_reason"] is None]
    buffer = _crop_buffer(len(wanted), zoom)  # (k, n_tiles, R, R, 3)
    sizes = np.zeros(len(rows), np.int64)
    done = 0
    for i in wanted:
        row = rows[i]
        try:
            make_crops(image_bytes[i], zoom, source=row["source"], out=buffer[done])
        except ImageError as err:
            row["bad_reason"], row["bad_message"] = err.reason, f"record {row['id']}: {err}"
            continue  # the next image reuses this slot
        sizes[i] = buffer[done].nbytes
        done += 1
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    pixels = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(buffer[:done])]
    )
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("pixels")))
    return table.add_column(ROW_SCHEMA.get_field_index("pixels"), "pixels", pixels)


@functools.cache
def _keep_freed_memory() -> bool:
    """``dragonfly.zoom.keep_freed_memory`` once per worker process that crops: the crop engine's
    temporaries are then reused rather than faulted in anew for every image (~30% of its CPU)."""
    from dragonfly.zoom import keep_freed_memory

    return keep_freed_memory()


_last_crop_buffer: np.ndarray | None = None


def _crop_buffer(n: int, zoom: ZoomConfig) -> np.ndarray:
    """Room for ``n`` samples' crops, uint8 (n, n_tiles, R, R, 3): the previous block's buffer again
    once nothing refers to it (its table was copied into the object store and dropped), else a new one.

    A block's buffer (8 x 13.9 MB) is above the sizes the allocator keeps for reuse, so a new one
    is mapped afresh for every block and each of its pages faulted in on first write: ~3-4 ms of
    CPU per sample against ~20 ms of cropping (2026-11-30, 2 cores). The price: each worker process
    that has cropped keeps one block's buffer (111 MB at R=336) while it lives.
    """
    global _last_crop_buffer
    shape = wire_shape(zoom)
    if n == 0:  # a block without images: no view to keep the buffer from the next block
        return np.empty((0, *shape), dtype=np.uint8)
    # One call at a time per process: Ray Data runs a task per worker process, and a pool's actor
    # one call at a time (no multi-threaded actors here).
    buffer = _last_crop_buffer
    # Three references mean only ours (the global, this name, getrefcount's argument: CPython 3.11
    # and 3.12); any more is a view or an Arrow buffer of a table still alive, whose pixels must not
    # change (test_a_blocks_crop_buffer_is_reused_only_once_nothing_refers_to_it fails if this
    # count goes wrong).
    if buffer is None or buffer.shape[1:] != shape or len(buffer) < n or sys.getrefcount(buffer) > 3:
        buffer = _last_crop_buffer = np.empty((n, *shape), dtype=np.uint8)
    return buffer[:n]


def _append(out, row, source, has_image, input_ids, labels, pixels, reason, message) -> None:
    out["id"].append(row["id"])
    out["local_index"].append(row["local_index"])
    out["source"].append(source)
    out["has_image"].append(has_image)
    out["input_ids"].append(np.asarray(input_ids, np.int32))
    out["labels"].append(np.asarray(labels, np.int32))
    out["pixels"].append(pixels)
    out["bad_reason"].append(reason)
    out["bad_message"].append(message)


# ---------------------------------------------------------------------------------------------
# Consumer side (in the train worker)


def bad_records_file_name(split: Split, rank: int) -> str:
    return f"bad_records-{split}-rank{rank}.jsonl"


class BadRecordLog:
    """Counts good and bad records, appends bad ones to a JSONL file and enforces
    ``max_bad_fraction``. One per rank and split; the file is appended to across epochs and
    resumes, one line per bad record seen: ``{"id", "source", "reason", "message", "epoch",
    "local_index"}`` (``local_index``: the record's position in the rank's order of that epoch)."""

    def __init__(
        self,
        path: str | None,
        max_bad_fraction: float,
        min_records: int = 100,
        epoch: int = 0,
        published_path: str | None = None,
    ):
        self.path = path
        self.published_path = published_path  # where the user finds the file, when not at ``path``
        self.max_bad_fraction = max_bad_fraction
        self.min_records = min_records
        self.epoch = epoch
        self.good = 0
        self.reasons: Counter[str] = Counter()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    @classmethod
    def for_rank(
        cls,
        data_cfg: DataConfig,
        out_dir: str,
        split: Split,
        rank: int,
        epoch: int = 0,
        fresh: bool = False,
        published_dir: str | None = None,
    ) -> BadRecordLog:
        """The log of ``rank`` at ``out_dir/bad_records-<split>-rank<r>.jsonl``; ``published_dir`` is
        where that file is copied for the user (the run's outputs), named in errors. ``fresh`` empties
        the file first: a pass that reads the same records again (each validation) lists them once,
        not once per pass."""
        name = bad_records_file_name(split, rank)
        path = os.path.join(out_dir, name)
        if fresh and os.path.exists(path):
            os.remove(path)
        published = f"{published_dir}/{name}" if published_dir else None
        return cls(path, data_cfg.max_bad_fraction, data_cfg.min_records_for_bad_fraction, epoch, published)

    @property
    def bad(self) -> int:
        return sum(self.reasons.values())

    @property
    def seen(self) -> int:
        return self.good + self.bad

    def add_good(self) -> None:
        self.good += 1

    def add_bad(
        self, record_id: str, source: str, reason: str, message: str, local_index: int | None = None
    ) -> None:
        self.reasons[reason] += 1
        if self.path:
            entry = {
                "id": record_id,
                "source": source,
                "reason": reason,
                "message": message,
                "epoch": self.epoch,
                "local_index": local_index,
            }
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        self.check(final=False)

    def check(self, final: bool) -> None:
        """Raise ``TooManyBadRecords`` once the bad fraction is over the limit (judged after
        ``min_records`` records, or at the end of the stream)."""
        if not self.seen or (not final and self.seen < self.min_records):
            return
        if self.bad / self.seen > self.max_bad_fraction:
            by_reason = ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
            raise TooManyBadRecords(
                f"{self.bad} of {self.seen} records were bad ({self.bad / self.seen:.1%}), over "
                f"max_bad_fraction={self.max_bad_fraction:.1%}; by reason: {by_reason}. "
                f"Records are listed in {self.published_path or self.path or '(no file)'}"
            )

    def summary(self) -> dict[str, Any]:
        return {"seen": self.seen, "good": self.good, "bad": self.bad, "bad_by_reason": dict(self.reasons)}


def keep_records_before(path: str, epoch: int, start: int) -> int:
    """Cut a rank's bad-records file back to the records before position ``start`` of ``epoch``,
    where a resumed run goes on reading (it meets the later ones again). The file published when
    a run stopped on ``TooManyBadRecords`` lists records past its last checkpoint. Returns the
    number of entries dropped."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a crash mid-write: its record comes again
            continue
    kept = [
        e
        for e in entries
        # Entries written before they had positions cannot be placed: kept.
        if e.get("local_index") is None or (e.get("epoch", 0), e["local_index"]) < (epoch, start)
    ]
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in kept)
    return len(lines) - len(kept)


def wire_shape(zoom: ZoomConfig) -> tuple[int, int, int, int]:
    """The layout of an image row's ``pixels`` bytes: C-order (n_tiles, R, R, 3), the crop engine's
    channels-last tiles as they are in memory."""
    return (zoom.n_tiles, zoom.resolution, zoom.resolution, 3)


def iter_samples(
    ds, *, zoom: ZoomConfig, bad_log: BadRecordLog, prefetch_batches: int = 2
) -> Iterator[dict[str, Any]]:
    """Good samples in stream order: ``{"id", "local_index", "input_ids", "labels", "pixels"}``
    (``pixels`` uint8 ``(n_tiles, 3, R, R)``, a read-only channels-last view of the block, or ``None``
    for text-only). Bad rows go to ``bad_log``."""
    shape = wire_shape(zoom)
    # batch_size=None: whole blocks as they come (no copy; re-batching would concatenate 14 MB rows).
    # prefetch_batches then counts blocks.
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches):
        pixel_views = _binary_views(table.column("pixels"))
        columns = table.drop_columns(["pixels"]).to_pydict()
        for i, bad_reason in enumerate(columns["bad_reason"]):
            if bad_reason is not None:
                bad_log.add_bad(
                    columns["id"][i],
                    columns["source"][i],
                    bad_reason,
                    columns["bad_message"][i],
                    columns["local_index"][i],
                )
                continue
            bad_log.add_good()
            yield {
                "id": columns["id"][i],
                "local_index": columns["local_index"][i],
                "input_ids": np.asarray(columns["input_ids"][i], np.int32),
                "labels": np.asarray(columns["labels"][i], np.int32),
                # No copy here: collate views a batch of one block's rows, or copies it out.
                "pixels": pixel_views[i].reshape(shape).transpose(0, 3, 1, 2)
                if columns["has_image"][i]
                else None,
            }
    bad_log.check(final=True)


def iter_train_batches(
    ds,
    batch_size: int,
    pad_token_id: int,
    bad_log: BadRecordLog,
    *,
    zoom: ZoomConfig,
    drop_last: bool = False,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """Collated training batches of ``batch_size`` good samples, padded to the batch's longest
    sequence (``dragonfly.processor.collate``): ``input_ids``, ``labels``, ``attention_mask``,
    ``has_image``, ``pixels`` (n_images, n_tiles, 3, R, R) uint8 if any, plus ``ids`` (list) and
    ``local_index`` (B,) int64. ``int(batch["local_index"].max()) + 1`` is the rank's resume ``start``.

    ``pixels`` of a batch whose images come from one block is a view of that block in Ray's object
    store (no copy; it keeps the block there while it lives). torch does not know it is read-only:
    never write into it in place (copy it first, or move it to the device as the trainer does).
    """
    import torch

    from dragonfly.processor import collate

    pending: list[dict] = []

    def flush() -> dict[str, Any]:
        batch = collate(pending, pad_token_id)
        batch["ids"] = [s["id"] for s in pending]
        batch["local_index"] = torch.tensor([s["local_index"] for s in pending], dtype=torch.long)
        pending.clear()
        return batch

    for sample in iter_samples(ds, zoom=zoom, bad_log=bad_log, prefetch_batches=prefetch_batches):
        pending.append(sample)
        if len(pending) == batch_size:
            yield flush()
    if pending and not drop_last:
        yield flush()


def _binary_views(column: pa.ChunkedArray) -> list[np.ndarray]:
    """Each value of a large_binary column as a uint8 numpy view of the Arrow buffer (no copy)."""
    views = []
    for chunk in column.chunks:
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
        views.extend(data[offsets[i] : offsets[i + 1]] for i in range(len(chunk)))
    return views


__all__ = [
    "DataConfig",
    "TooManyBadRecords",
    "BadRecordLog",
    "bad_records_file_name",
    "keep_records_before",
    "unoffered_preprocess_resources",
    "actor_pool_cpus",
    "ROW_SCHEMA",
    "rank_indices",
    "build_rank_dataset",
    "build_dataset",
    "tokenize_rows",
    "fetch_images",
    "make_crop_rows",
    "CropRows",
    "iter_samples",
    "iter_train_batches",
    "wire_shape",
]
