"""The demo dataset: deterministic, well-formed, with the fine detail where we say it is."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dragonfly.config import TokenConfig, ZoomConfig
from dragonfly.processor import DragonflyProcessor, RecordError
from dragonfly.tiny import build_tiny_tokenizer
from dragonfly.zoom import make_crops, zoom_grids
from dragonfly_platform.demo_data import PLANTED_BAD_REASONS, write_demo_dataset
from dragonfly_platform.manifest import read_manifest
from dragonfly_platform.storage import StorageConfig
from dragonfly_platform.zoom_report import EXIF_ORIENTATION, header_size, plot_cdf, summarize


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = write_demo_dataset(out, n_train=21, n_val=7, seed=3, with_bad_records=True)
    return out, summary


def test_same_arguments_give_identical_files(demo, tmp_path):
    out, _ = demo
    write_demo_dataset(tmp_path, n_train=21, n_val=7, seed=3, with_bad_records=True)
    assert _digest(tmp_path) == _digest(out)


def test_splits_counts_and_paths(demo):
    out, summary = demo
    train = read_manifest(str(out / "train.jsonl"))
    val = read_manifest(str(out / "val.jsonl"))
    assert len(train) == 21 + len(PLANTED_BAD_REASONS) == summary["n_train"]
    assert len(val) == 7 == summary["n_val"]
    assert len({r.id for r in train + val}) == len(train) + len(val)
    good = [r for r in train + val if r.id not in PLANTED_BAD_REASONS]
    assert sum(not r.has_image for r in good) == summary["n_train_text_only"] + summary["n_val_text_only"] > 0
    for record in good:
        if record.has_image:
            with Image.open(out / record.image) as image:
                image.load()
                assert image.mode == "RGB"


def test_good_records_tokenize_and_planted_ones_fail_for_their_reason(demo):
    out, _ = demo
    processor = DragonflyProcessor(
        build_tiny_tokenizer(),
        ZoomConfig(resolution=28),
        TokenConfig(tokens=(("low", 4), ("medium", 1), ("high", 1)), keep_cls=False, separator=False),
        max_length=512,
    )
    for record in read_manifest(str(out / "train.jsonl")):
        reason = PLANTED_BAD_REASONS.get(record.id)
        if reason in ("unknown_role", "empty_answer", "no_conversations"):
            with pytest.raises(RecordError) as err:
                processor.encode(record.conversations, record.has_image, record_id=record.id)
            assert err.value.reason == reason
        else:
            sample = processor.encode(record.conversations, record.has_image, record_id=record.id)
            assert (sample["labels"] != -100).any()
    assert not (out / "images/bad/does_not_exist.png").exists()
    truncated = (out / "images/bad/truncated.jpg").read_bytes()
    assert truncated[:2] == b"\xff\xd8" and not truncated.endswith(b"\xff\xd9")


def test_fine_detail_is_small_on_a_large_canvas(demo):
    out, _ = demo
    lines = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    digits = [
        r
        for r in lines
        if r["conversations"]
        and r["conversations"][0]["value"].endswith("What number is written in the image?")
    ]
    assert digits
    for record in digits:
        answer = record["conversations"][1]["value"]
        assert answer.isdigit()
        pixels = np.asarray(Image.open(out / record["image"]).convert("L"))
        ys, xs = np.nonzero(pixels < 150)  # the text is dark, the canvas light
        text_area = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
        assert max(pixels.shape) >= 1600
        # The number covers well under 0.1% of the image: at 336 px it would be a few pixels wide.
        assert text_area / pixels.size < 1e-3


def test_zoom_report_reads_headers_and_matches_the_crop_engine(demo, tmp_path):
    out, _ = demo
    zoom = ZoomConfig(resolution=28)
    paths = sorted((out / "images").rglob("*.png"))[:6] + sorted((out / "images" / "photos").glob("*.jpg"))
    paths = [p for p in paths if p.parent.name != "bad"]
    # A photo stored sideways with an EXIF rotation: the engine (and the report) see it upright.
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.new("RGB", (300, 100), (10, 200, 30)).save(sideways, exif=exif)
    for path in [*paths, sideways]:
        crops = make_crops(path.read_bytes(), zoom, source=str(path))
        size = header_size(str(path), StorageConfig())
        assert size == crops.native_size
        assert zoom_grids(size, zoom) == (crops.medium_grid, crops.high_grid, crops.zoom_ratio)
    assert header_size(str(sideways), StorageConfig()) == (100, 300)

    summary = summarize(np.array([1.0, 2.0, 3.0, 4.0, 8.0]), unreadable=1, zoom=zoom)
    assert summary["share_at_least_2x"] == 0.8 and summary["share_at_least_4x"] == 0.4
    plot_cdf(np.array([0.5, 2.5, 5.0]), str(tmp_path / "cdf.png"))
    assert Image.open(tmp_path / "cdf.png").format == "PNG"
