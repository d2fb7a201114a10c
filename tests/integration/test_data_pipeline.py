"""The Ray Data pipeline end to end on a real local Ray cluster and a real S3 server.

Tiny crops (R=28) and a small demo dataset with planted bad records keep each run short.
"""

from __future__ import annotations

import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import s3fs
from PIL import Image

from dragonfly.config import TokenConfig, ZoomConfig
from dragonfly.processor import DragonflyProcessor, collate
from dragonfly.tiny import build_tiny_tokenizer
from dragonfly.zoom import make_crops
from dragonfly_platform.data import (
    ROW_SCHEMA,
    BadRecordLog,
    DataConfig,
    TooManyBadRecords,
    build_dataset,
    build_rank_dataset,
    fetch_images,
    iter_samples,
    iter_train_batches,
    keep_records_before,
    rank_indices,
)
from dragonfly_platform.demo_data import PLANTED_BAD_REASONS, write_demo_dataset
from dragonfly_platform.manifest import ManifestFormatError, read_manifest
from dragonfly_platform.services import start_s3
from dragonfly_platform.storage import StorageConfig, StorageUnavailableError

ZOOM = ZoomConfig(resolution=28, max_image_pixels=4_000_000)
MAX_LENGTH = 256
# Records added to the demo's planted ones: reasons only a test setup can plant cheaply.
EXTRA_BAD_REASONS = {"bad-too-long": "too_long", "bad-too-many-pixels": "too_many_pixels"}
EXPECTED_BAD = {**PLANTED_BAD_REASONS, **EXTRA_BAD_REASONS}


@pytest.fixture(scope="module")
def processor():
    tokens = TokenConfig(tokens=(("low", 4), ("medium", 1), ("high", 1)), keep_cls=False, separator=False)
    return DragonflyProcessor(build_tiny_tokenizer(), ZOOM, tokens, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo data (17 good train records, some text-only) plus one bad record for every reason."""
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, n_train=17, n_val=4, seed=1, with_bad_records=True)
    Image.new("RGB", (2100, 2000), (90, 120, 200)).save(out / "images" / "huge.png")  # 4.2 MP > limit
    ask = [{"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "Blue."}]
    long_answer = [{"from": "human", "value": "Tell me everything."}, {"from": "gpt", "value": "word " * 400}]
    with open(out / "train.jsonl", "a") as f:
        f.write(
            json.dumps({"id": "bad-too-many-pixels", "image": "images/huge.png", "conversations": ask}) + "\n"
        )
        f.write(json.dumps({"id": "bad-too-long", "conversations": long_answer}) + "\n")
    return out


def _config(manifest: str, **overrides) -> DataConfig:
    settings = dict(
        train_manifest=manifest,
        rows_per_block=2,
        preprocess_num_cpus=0.5,
        # Two crop tasks in flight: blocks can finish out of order (what preserve_order is for)
        # without starting a worker process per logical CPU.
        preprocess_concurrency=2,
        max_bad_fraction=0.5,
        min_records_for_bad_fraction=5,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def _expected_sample(processor, record, image_root: Path) -> dict:
    sample = processor.encode(record.conversations, record.has_image, record_id=record.id)
    pixels = make_crops((image_root / record.image).read_bytes(), ZOOM).pixels if record.has_image else None
    return {**sample, "pixels": pixels}


def _check_round_trip(samples: list[dict], log: BadRecordLog, records, processor, image_root: Path):
    good = [r for r in records if r.id not in EXPECTED_BAD]
    by_id = {s["id"]: s for s in samples}
    assert len(by_id) == len(samples), "a record came out twice"
    assert sorted(by_id) == sorted(r.id for r in good)
    for record in good:
        expected, sample = _expected_sample(processor, record, image_root), by_id[record.id]
        np.testing.assert_array_equal(sample["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(sample["labels"], expected["labels"])
        if record.has_image:
            assert sample["pixels"].dtype == np.uint8 and sample["pixels"].shape == (ZOOM.n_tiles, 3, 28, 28)
            np.testing.assert_array_equal(sample["pixels"], expected["pixels"])
        else:
            assert sample["pixels"] is None
    assert log.good == len(good) and log.bad == len(EXPECTED_BAD)
    assert log.seen == len(records)
    assert dict(log.reasons) == dict(sorted(_count(EXPECTED_BAD.values()).items()))


def _count(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _bad_file(path) -> dict[str, dict]:
    return {entry["id"]: entry for entry in map(json.loads, Path(path).read_text().splitlines())}


# ---------------------------------------------------------------------------------------------
# No Ray needed


def test_rank_rows_partition_the_manifest_with_sizes_within_one():
    for n, world in [(23, 2), (23, 4), (3, 4), (100, 3)]:
        parts = [rank_indices(n, rank=r, world_size=world, epoch=5, seed=9) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # Another epoch is another order; the same (seed, epoch) is the same order.
    first = rank_indices(50, rank=0, world_size=2, epoch=0, seed=1)
    assert not np.array_equal(first, rank_indices(50, rank=0, world_size=2, epoch=1, seed=1))
    np.testing.assert_array_equal(first, rank_indices(50, rank=0, world_size=2, epoch=0, seed=1))


def test_bad_fraction_is_judged_after_the_minimum_then_on_every_bad_record(tmp_path):
    log = BadRecordLog(str(tmp_path / "bad.jsonl"), max_bad_fraction=0.25, min_records=4)
    log.add_bad("a", "x.png", "missing_file", "gone")
    log.add_bad("b", "y.png", "truncated", "cut")  # 2 of 2 bad, but under the minimum: no verdict yet
    log.add_good()
    log.add_good()
    log.add_good()
    log.add_good()
    with pytest.raises(TooManyBadRecords, match=r"3 of 7 records were bad .*missing_file: 2, truncated: 1"):
        log.add_bad("c", "z.png", "missing_file", "gone")
    assert [e["reason"] for e in _bad_file(tmp_path / "bad.jsonl").values()] == [
        "missing_file",
        "truncated",
        "missing_file",
    ]
    short = BadRecordLog(None, max_bad_fraction=0.25, min_records=100)
    short.add_good()
    short.add_bad("a", "x", "truncated", "cut")
    with pytest.raises(TooManyBadRecords):
        short.check(final=True)  # the end of the stream judges whatever was seen


def test_a_fresh_rank_log_lists_a_reread_split_once(tmp_path):
    """Training appends across epochs and resumes; each validation rereads the same records, so its
    log starts the file afresh."""
    config = DataConfig(train_manifest="unused.jsonl")

    def pass_over_one_bad_record(fresh: bool) -> int:
        log = BadRecordLog.for_rank(config, str(tmp_path), "val", rank=1, fresh=fresh)
        log.add_bad("v1", "v1.png", "missing_file", "gone")
        return len((tmp_path / "bad_records-val-rank1.jsonl").read_text().splitlines())

    assert [pass_over_one_bad_record(fresh=False) for _ in range(2)] == [1, 2]
    assert [pass_over_one_bad_record(fresh=True) for _ in range(2)] == [1, 1]


def test_a_resumed_rank_keeps_the_bad_records_before_its_position_only(tmp_path):
    """A run that stopped on too many bad records published every record it had met, past its last
    checkpoint too; resumed (the budget raised) from that checkpoint, it meets the later ones again
    and must not list them twice."""
    path = tmp_path / "bad_records-train-rank0.jsonl"
    for epoch, positions in ((0, [3, 9]), (1, [2, 5, 6])):
        log = BadRecordLog(str(path), max_bad_fraction=1.0, epoch=epoch)
        for i in positions:
            log.add_bad(f"e{epoch}-{i}", f"{i}.png", "truncated", "cut", local_index=i)
    with open(path, "a") as f:  # an entry of a file written before entries had positions: kept
        f.write(
            json.dumps({"id": "old", "source": "o.png", "reason": "truncated", "message": "", "epoch": 0})
            + "\n"
        )
        f.write('{"id": "torn", "sour')  # a crash mid-write: dropped (the record comes again)

    assert keep_records_before(str(path), epoch=1, start=5) == 3  # resumes at position 5 of epoch 1
    assert list(_bad_file(path)) == ["e0-3", "e0-9", "e1-2", "old"]
    assert keep_records_before(str(path), epoch=1, start=5) == 0
    assert keep_records_before(str(path), epoch=0, start=4) == 2
    assert list(_bad_file(path)) == ["e0-3", "old"]


def test_a_local_file_that_cannot_be_read_is_a_bad_record_not_an_outage(tmp_path, monkeypatch):
    """A locked file among readable ones (a shared dataset folder) skips that record; it used to
    stop the job as "could not read ... from AWS S3". The tests run as root, who reads any file, so
    open() is made to refuse that one path as it refuses other users."""
    import builtins

    locked, readable = tmp_path / "locked.png", tmp_path / "ok.png"
    locked.write_bytes(b"png")
    readable.write_bytes(b"png")
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    rows = [
        {"id": name, "local_index": i, "source": str(path), "has_image": True}
        for i, (name, path) in enumerate(
            [("locked", locked), ("ok", readable), ("gone", tmp_path / "no.png")]
        )
    ]
    batch = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    fetched = fetch_images(batch, storage=StorageConfig(), threads=2).to_pylist()
    assert [(r["id"], r["bad_reason"], r["image_bytes"]) for r in fetched] == [
        ("locked", "unreadable_file", None),
        ("ok", None, b"png"),
        ("gone", "missing_file", None),
    ]


def test_a_blocks_crop_buffer_is_reused_only_once_nothing_refers_to_it(demo):
    """make_crop_rows writes a block's crops into the previous block's buffer once that block's
    table is gone (a fresh 111 MB buffer per block costs a page fault per 4 KiB); while a table is
    alive, the next block must not write into its pixels."""
    from dragonfly_platform import data

    records = [
        r for r in read_manifest(str(demo / "train.jsonl")) if r.has_image and r.id not in EXPECTED_BAD
    ]

    def crop_block(recs) -> pa.Table:
        rows = [
            {
                "id": r.id,
                "local_index": i,
                "source": r.image,
                "has_image": True,
                "input_ids": [1],
                "labels": [1],
            }
            for i, r in enumerate(recs)
        ]
        images = pa.array([(demo / r.image).read_bytes() for r in recs], type=pa.large_binary())
        block = pa.Table.from_pylist(rows, schema=ROW_SCHEMA).append_column("image_bytes", images)
        return data.make_crop_rows(block, zoom=ZOOM)

    def pixels(table: pa.Table) -> list[np.ndarray]:
        # The wire's channels-last bytes, viewed as the crop engine's (n_tiles, 3, R, R), as iter_samples does.
        shape = data.wire_shape(ZOOM)
        return [
            np.frombuffer(v.as_py(), np.uint8).reshape(shape).transpose(0, 3, 1, 2)
            for v in table.column("pixels")
        ]

    expected = [make_crops((demo / r.image).read_bytes(), ZOOM).pixels for r in records[:4]]
    first = crop_block(records[:2])
    second = crop_block(records[2:4])  # while the first table is alive
    for got, want in zip(pixels(first) + pixels(second), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    address = data._last_crop_buffer.ctypes.data  # the second block's
    del first, second
    third = crop_block(records[:1])
    assert data._last_crop_buffer.ctypes.data == address  # reused
    np.testing.assert_array_equal(pixels(third)[0], expected[0])


_CROP_BLOCK_FAULTS = """
import resource, sys
from pathlib import Path
import pyarrow as pa
from dragonfly.config import ZoomConfig
from dragonfly_platform.data import ROW_SCHEMA, make_crop_rows

paths = sys.argv[1:]
rows = [
    {"id": str(i), "local_index": i, "source": p, "has_image": True, "input_ids": [1], "labels": [1]}
    for i, p in enumerate(paths)
]
images = pa.array([Path(p).read_bytes() for p in paths], type=pa.large_binary())
block = pa.Table.from_pylist(rows, schema=ROW_SCHEMA).append_column("image_bytes", images)
zoom = ZoomConfig(resolution=336)
for _ in range(2):  # the heap grows to its peak
    make_crop_rows(block, zoom=zoom)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    make_crop_rows(block, zoom=zoom)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (3 * len(paths)))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_cropping_workers_keep_the_memory_each_image_frees(demo):
    """make_crop_rows has its worker process keep freed memory (dragonfly.zoom.keep_freed_memory):
    the crop engine's temporaries are reused from one image to the next, not faulted in anew
    (usually thousands of page faults per image without it, ~30% of the crop engine's CPU)."""
    paths = [
        str(demo / r.image)
        for r in read_manifest(str(demo / "train.jsonl"))
        if r.has_image and r.id not in EXPECTED_BAD
    ][:8]
    run = subprocess.run(
        [sys.executable, "-c", _CROP_BLOCK_FAULTS, *paths],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(run.stdout.split()[-1]) < 300


def test_too_many_bad_records_names_the_published_file(tmp_path):
    """A training worker writes its log locally and publishes it to the run's folder: the error must
    send the user to the published copy, not to a temporary file on some worker node."""
    config = DataConfig(train_manifest="unused.jsonl", max_bad_fraction=0.0)
    published = "s3://bucket/runs/r1/bad_records"
    log = BadRecordLog.for_rank(config, str(tmp_path), "train", rank=1, published_dir=published)
    log.add_bad("t1", "t1.png", "truncated", "cut")
    with pytest.raises(TooManyBadRecords, match=f"listed in {published}/bad_records-train-rank1.jsonl$"):
        log.check(final=True)
    assert (tmp_path / "bad_records-train-rank1.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Real Ray


def test_a_manifest_that_is_not_one_fails_before_any_work(ray_cluster, tmp_path, processor):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": 1, "image": "a.png", "conversations": []}\nid,image\n2,b.png\n')
    with pytest.raises(ManifestFormatError, match="line 2: not JSON"):
        build_dataset(_config(str(bad)), processor, "train")


@pytest.mark.parametrize("pool", ["tasks", "actors"])
def test_manifest_round_trip(ray_cluster, demo, processor, tmp_path, pool):
    config = _config(str(demo / "train.jsonl"), preprocess_pool=pool)
    ds, n_rows = build_dataset(config, processor, "train")
    records = read_manifest(str(demo / "train.jsonl"))
    assert n_rows == len(records)
    log = BadRecordLog.for_rank(config, str(tmp_path), "train", rank=0)
    samples = list(iter_samples(ds, zoom=ZOOM, bad_log=log))
    assert [s["local_index"] for s in samples] == sorted(s["local_index"] for s in samples)  # stream order
    _check_round_trip(samples, log, records, processor, demo)
    # Two images of one block collate into a view of the block in the object store (no copy); two
    # from different blocks are copied. Either way the batch holds the pixels it was given.
    block_of = {s["id"]: s["local_index"] // config.rows_per_block for s in samples}
    images = [s for s in samples if s["pixels"] is not None]
    pairs = list(itertools.pairwise(images))
    same = next(p for p in pairs if block_of[p[0]["id"]] == block_of[p[1]["id"]])
    apart = next(p for p in pairs if block_of[p[0]["id"]] != block_of[p[1]["id"]])
    for pair, shared in ((same, True), (apart, False)):
        pixels = collate(list(pair), processor.pad_token_id)["pixels"]
        assert (pixels.data_ptr() == pair[0]["pixels"].ctypes.data) is shared
        np.testing.assert_array_equal(pixels.numpy(), np.stack([s["pixels"] for s in pair]))
    written = _bad_file(tmp_path / "bad_records-train-rank0.jsonl")
    assert {i: e["reason"] for i, e in written.items()} == EXPECTED_BAD
    # One rank, manifest order: a record's position is its line (where a resume cuts the file).
    assert {i: e["local_index"] for i, e in written.items()} == {
        r.id: line for line, r in enumerate(records) if r.id in EXPECTED_BAD
    }
    assert written["bad-missing-file"]["source"] == str(demo / "images/bad/does_not_exist.png")
    assert written["bad-too-long"]["source"] == f"{demo / 'train.jsonl'}:{len(records)}"
    # Tokenize, fetch and crop ran as one task (same resources): image bytes never crossed the
    # object store, and no stage held CPU budget in front of the crops (docs/benchmarks.md).
    crop = {"tasks": "make_crop_rows", "actors": "CropRows"}[pool]
    assert f"Operator 1 MapBatches(tokenize_rows)->MapBatches(fetch_images)->MapBatches({crop})" in ds.stats()
    # Validation runs on tasks whatever the pool: mid-epoch, the training pools keep their CPUs.
    val_config = config.model_copy(update={"val_manifest": str(demo / "val.jsonl")})
    val, _ = build_dataset(val_config, processor, "val")
    assert (
        len(
            list(
                iter_samples(
                    val, zoom=ZOOM, bad_log=BadRecordLog.for_rank(val_config, str(tmp_path), "val", rank=0)
                )
            )
        )
        == 4
    )
    assert "MapBatches(fetch_images)->MapBatches(make_crop_rows)" in val.stats()


def test_each_preprocessing_task_takes_exactly_rows_per_block_rows(ray_cluster, demo, processor):
    """Blocks of rows_per_block rows in manifest order, the last one shorter. Spread evenly instead
    (from_items), 8-row batches over the 7- and 6-row blocks of this manifest (25 rows) made tasks
    of 12-13 rows and output blocks above the size rows_per_block promises."""
    config = _config(str(demo / "train.jsonl"), rows_per_block=8)
    ds, n_rows = build_dataset(config, processor, "train")
    blocks = [
        table.column("local_index").to_pylist()
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    assert [len(b) for b in blocks] == [8] * (n_rows // 8) + ([n_rows % 8] if n_rows % 8 else [])
    assert sum(blocks, []) == list(range(n_rows))


def test_preprocessing_workers_keep_a_few_processors_by_name(ray_cluster):
    """Every rank, epoch and split of a run puts its own copy of the run's processor; a worker
    unpickles it once per name (a real tokenizer takes ~1 s), keeping the last few names."""
    import ray

    from dragonfly_platform import data

    assert data._processor(ray.put("run A's processor"), "run-a") == "run A's processor"
    assert data._processor(ray.put("another copy"), "run-a") == "run A's processor"  # not unpickled
    for i in range(data._PROCESSORS_KEPT):
        data._processor(ray.put(f"processor {i}"), f"run-{i}")
    assert data._processor(ray.put("run A's, again"), "run-a") == "run A's, again"  # evicted


def test_two_ranks_split_uneven_data_exactly_and_resume_mid_epoch(ray_cluster, demo, processor, tmp_path):
    # One rank may get most of the 8 bad records: this test is about the split, not the budget.
    config = _config(str(demo / "train.jsonl"), max_bad_fraction=0.9)
    records = read_manifest(str(demo / "train.jsonl"))
    assert len(records) % 2 == 1  # uneven on purpose
    per_rank, batches, sizes = {}, {}, {}
    for rank in (0, 1):
        ds, sizes[rank] = build_rank_dataset(
            config, processor, "train", rank=rank, world_size=2, epoch=3, seed=7
        )
        log = BadRecordLog.for_rank(config, str(tmp_path), "train", rank)
        batches[rank] = list(iter_train_batches(ds, 3, processor.pad_token_id, log, zoom=ZOOM))
        per_rank[rank] = (log, [i for b in batches[rank] for i in b["ids"]])
    # Every row exactly once across ranks, bad ones in their rank's file; sizes differ by one.
    assert abs(sizes[0] - sizes[1]) == 1 and sizes[0] + sizes[1] == len(records)
    ids = per_rank[0][1] + per_rank[1][1]
    assert sorted(ids) == sorted(r.id for r in records if r.id not in EXPECTED_BAD)
    files = [_bad_file(tmp_path / f"bad_records-train-rank{r}.jsonl") for r in (0, 1)]
    assert sorted([*files[0], *files[1]]) == sorted(EXPECTED_BAD)
    assert sum(per_rank[r][0].seen for r in (0, 1)) == len(records)
    # Batches: padded to the batch's longest sequence, positions ascending.
    for batch in batches[0]:
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max())
        n_images = int(batch["has_image"].sum())
        if n_images:
            assert batch["pixels"].shape == (n_images, ZOOM.n_tiles, 3, 28, 28)
    positions = [int(i) for b in batches[0] for i in b["local_index"]]
    assert positions == sorted(positions)

    # Resume rank 0 after its second batch: exactly the rest of the epoch, no row twice.
    start = int(batches[0][1]["local_index"].max()) + 1
    ds, _ = build_rank_dataset(config, processor, "train", rank=0, world_size=2, epoch=3, seed=7, start=start)
    log = BadRecordLog(None, config.max_bad_fraction)
    resumed = [s["id"] for s in iter_samples(ds, zoom=ZOOM, bad_log=log)]
    assert resumed == per_rank[0][1][6:]
    # Resumed exactly at the end of the epoch: nothing left.
    ds, _ = build_rank_dataset(
        config, processor, "train", rank=0, world_size=2, epoch=3, seed=7, start=sizes[0]
    )
    assert list(iter_samples(ds, zoom=ZOOM, bad_log=log)) == []


def test_crossing_max_bad_fraction_stops_with_counts_by_reason(ray_cluster, demo, processor, tmp_path):
    config = _config(str(demo / "train.jsonl"), max_bad_fraction=0.05, min_records_for_bad_fraction=3)
    ds, _ = build_dataset(config, processor, "train")
    log = BadRecordLog.for_rank(config, str(tmp_path), "train", rank=0)
    with pytest.raises(
        TooManyBadRecords, match=r"records were bad .* over max_bad_fraction=5\.0%; by reason: "
    ):
        list(iter_samples(ds, zoom=ZOOM, bad_log=log))


def _storage(server) -> StorageConfig:
    return StorageConfig(
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
        retries=2,
        connect_timeout_s=2,
        read_timeout_s=5,
    )


def _upload(server, local: Path, prefix: str) -> None:
    fs = s3fs.S3FileSystem(**server.storage_options())
    fs.put(str(local) + "/", f"test-bucket/{prefix}/", recursive=True)


def test_manifest_and_images_from_s3(ray_cluster, s3_server, demo, processor, tmp_path):
    _upload(s3_server, demo, "demo")
    storage = _storage(s3_server)
    config = _config("s3://test-bucket/demo/train.jsonl", storage=storage)
    records = read_manifest(config.train_manifest, storage)
    ds, _ = build_dataset(config, processor, "train")
    log = BadRecordLog.for_rank(config, str(tmp_path), "train", rank=0)
    samples = list(iter_samples(ds, zoom=ZOOM, bad_log=log))
    _check_round_trip(samples, log, records, processor, demo)
    missing = _bad_file(tmp_path / "bad_records-train-rank0.jsonl")["bad-missing-file"]
    assert missing["source"] == "s3://test-bucket/demo/images/bad/does_not_exist.png"
    assert missing["reason"] == "missing_file"


def test_s3_server_stopping_mid_job_gives_retries_then_a_clear_error(ray_cluster, demo, processor, tmp_path):
    server = start_s3(tmp_path / "s3")  # our own: the session's server must survive this test
    try:
        server.create_bucket("test-bucket")
        _upload(server, demo, "demo")
        storage = _storage(server)
        config = _config("s3://test-bucket/demo/train.jsonl", storage=storage)
        ds, _ = build_dataset(config, processor, "train")  # the manifest came from S3 ...
        server.kill()  # ... and the server is gone before the images are read
        with pytest.raises(
            Exception, match=r"could not read s3://test-bucket/demo/images/.* after 2 attempts"
        ):
            list(iter_samples(ds, zoom=ZOOM, bad_log=BadRecordLog(None, 1.0)))
        with pytest.raises(StorageUnavailableError, match=rf"from {server.endpoint_url} after 2 attempts"):
            storage.read_bytes("s3://test-bucket/demo/train.jsonl")
    finally:
        server.stop()


def test_zoom_report_job(ray_cluster, demo, tmp_path, capsys):
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "zoom_report_job", Path(__file__).parents[2] / "jobs" / "zoom_report.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert (
        job.main(["--manifest", str(demo / "val.jsonl"), "--out", str(tmp_path), "--resolution", "336"]) == 0
    )
    images = [r for r in read_manifest(str(demo / "val.jsonl")) if r.has_image]
    rows = list(csv.DictReader((tmp_path / "zoom_ratios.csv").read_text().splitlines()))
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in images)
    for row, record in zip(
        sorted(rows, key=lambda r: r["id"]), sorted(images, key=lambda r: r.id), strict=True
    ):
        crops = make_crops((demo / record.image).read_bytes(), ZoomConfig(resolution=336))
        assert float(row["zoom_ratio"]) == pytest.approx(crops.zoom_ratio)
    summary = json.loads((tmp_path / "zoom_report.json").read_text())
    ratios = [float(r["zoom_ratio"]) for r in rows]
    assert summary["share_at_least_2x"] == pytest.approx(np.mean(np.array(ratios) >= 2))
    assert (tmp_path / "zoom_ratio_cdf.png").stat().st_size > 1000
    assert "zoomed in at least 2x" in capsys.readouterr().out
