"""A small, deterministic LLaVA-format demo dataset written by the project.

Three kinds of image records and some text-only ones:

- photographs bundled with scikit-image (no downloads), each asked about with a few question
  templates and answered with a caption written here; the same photo serves several records, as in
  SVIT (useful for the curation job's per-image cap);
- fine-detail images: a short number or word drawn in small type somewhere on a large canvas (the
  answer needs the zoomed-in crops, which is Dragonfly's point);
- bar charts with small labels: "Which bar is tallest?";
- text-only arithmetic questions (the paper mixes in text-only data).

``write_demo_dataset(out, n_train, n_val, seed)`` writes ``images/...``, ``train.jsonl`` and
``val.jsonl`` (image paths relative to ``out``). The same arguments give byte-identical files.
``with_bad_records=True`` appends records that must be skipped, one per reason, so the bad-records
accounting has something to show; ``PLANTED_BAD_REASONS`` maps their ids to the expected reasons.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Bundled scikit-image photos -> a caption written for the demo.
PHOTOS: dict[str, str] = {
    "astronaut.png": "an astronaut in a white spacesuit in front of an American flag",
    "chelsea.png": "a ginger tabby cat",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a rocket standing on its launch pad",
    "camera.png": "a man with a camera on a tripod",
    "hubble_deep_field.jpg": "many distant galaxies in deep space",
    "motorcycle_left.png": "a motorcycle in a workshop",
    "coins.png": "old coins on a dark background",
    "ihc.png": "stained tissue under a microscope",
    "moon.png": "the cratered surface of the moon",
}
PHOTO_QUESTIONS = (
    "What is in the image?",
    "Describe the image briefly.",
    "What is the main subject of this picture?",
)
WORDS = ("river", "lantern", "orbit", "maple", "harbor", "violet", "signal", "meadow", "copper", "falcon")
BAR_LABELS = ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa")
# Record kinds in the order they are cycled through.
KINDS = ("photo", "digits", "chart", "word", "photo", "digits", "text")

PLANTED_BAD_REASONS: dict[str, str] = {
    "bad-missing-file": "missing_file",
    "bad-truncated-jpeg": "truncated",
    "bad-not-an-image": "not_an_image",
    "bad-unknown-role": "unknown_role",
    "bad-empty-answer": "empty_answer",
    "bad-no-conversations": "no_conversations",
}


def _photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _conversation(question: str, answer: str, with_image: bool) -> list[dict]:
    prompt = f"<image>\n{question}" if with_image else question
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow's bundled default font: no font files on disk needed.
    return ImageFont.load_default(size=size)


def _canvas(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Faint noise, so the canvas is not trivially compressible or uniform.
    base = rng.integers(225, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.NEAREST)


def _small_text_image(rng: np.random.Generator, text: str) -> Image.Image:
    width, height = [(1600, 1200), (1200, 1600), (2000, 800)][int(rng.integers(3))]
    image = _canvas(rng, width, height)
    draw = ImageDraw.Draw(image)
    font = _font(int(rng.integers(12, 18)))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(20, width - (right - left) - 20))
    y = int(rng.integers(20, height - (bottom - top) - 20))
    colour = tuple(int(c) for c in rng.integers(0, 90, size=3))
    draw.text((x, y), text, fill=colour, font=font)
    return image


def _chart_image(rng: np.random.Generator) -> tuple[Image.Image, str]:
    n_bars = int(rng.integers(3, 6))
    labels = [str(s) for s in rng.choice(BAR_LABELS, size=n_bars, replace=False)]
    heights = rng.choice(np.arange(20, 100), size=n_bars, replace=False)  # distinct: one tallest bar
    width, height = 1200, 900
    image = _canvas(rng, width, height)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    slot = (width - 200) // n_bars
    baseline = height - 120
    for i, (label, h) in enumerate(zip(labels, heights, strict=False)):
        x0 = 100 + i * slot + slot // 4
        x1 = x0 + slot // 2
        colour = tuple(int(c) for c in rng.integers(40, 200, size=3))
        draw.rectangle([x0, baseline - int(h) * 6, x1, baseline], fill=colour)
        draw.text((x0, baseline + 8), label, fill=(20, 20, 20), font=font)
    draw.line([80, baseline, width - 80, baseline], fill=(0, 0, 0), width=2)
    return image, labels[int(np.argmax(heights))]


def _text_only(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(2, 50, size=2))
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", str(a + b)
    return f"What is {a} times {b}?", str(a * b)


def _make_split(out: Path, split: str, n: int, rng: np.random.Generator) -> list[dict]:
    photos = sorted(PHOTOS)
    image_dir = out / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        record_id = f"{split}-{i:05d}"
        if kind == "photo":
            name = photos[int(rng.integers(len(photos)))]
            question = PHOTO_QUESTIONS[int(rng.integers(len(PHOTO_QUESTIONS)))]
            records.append(
                {
                    "id": record_id,
                    "image": f"images/photos/{name}",
                    "conversations": _conversation(question, PHOTOS[name].capitalize() + ".", True),
                }
            )
            continue
        if kind == "text":
            question, answer = _text_only(rng)
            records.append({"id": record_id, "conversations": _conversation(question, answer, False)})
            continue
        if kind == "digits":
            answer = str(int(rng.integers(1000, 1_000_000)))
            image = _small_text_image(rng, answer)
            question = "What number is written in the image?"
        elif kind == "word":
            answer = str(rng.choice(WORDS))
            image = _small_text_image(rng, answer)
            question = "What word is written in the image?"
        else:
            image, answer = _chart_image(rng)
            question = "Which bar is tallest?"
        path = f"images/{split}/{record_id}.png"
        image.save(out / path, compress_level=1)  # fast; the demo favours speed over bytes
        records.append(
            {"id": record_id, "image": path, "conversations": _conversation(question, answer, True)}
        )
    return records


def _copy_photos(out: Path) -> None:
    # Re-encoded as RGB so the demo has no grey or palette surprises; JPEG stays JPEG.
    target = out / "images" / "photos"
    target.mkdir(parents=True, exist_ok=True)
    for name in sorted(PHOTOS):
        with Image.open(_photo_dir() / name) as image:
            rgb = image.convert("RGB")
        if name.endswith(".jpg"):
            rgb.save(target / name, quality=90)
        else:
            rgb.save(target / name, compress_level=1)


def _planted_bad_records(out: Path) -> list[dict]:
    bad_dir = out / "images" / "bad"
    bad_dir.mkdir(parents=True, exist_ok=True)
    jpeg = (out / "images" / "photos" / "rocket.jpg").read_bytes()
    (bad_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (bad_dir / "not_an_image.png").write_bytes(b"this file is text, not a PNG\n" * 10)
    ask = _conversation("What is in the image?", "A rocket.", True)
    return [
        {"id": "bad-missing-file", "image": "images/bad/does_not_exist.png", "conversations": ask},
        {"id": "bad-truncated-jpeg", "image": "images/bad/truncated.jpg", "conversations": ask},
        {"id": "bad-not-an-image", "image": "images/bad/not_an_image.png", "conversations": ask},
        {
            "id": "bad-unknown-role",
            "image": "images/photos/rocket.jpg",
            "conversations": [{"from": "robot", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}],
        },
        {
            "id": "bad-empty-answer",
            "image": "images/photos/rocket.jpg",
            "conversations": _conversation("What is in the image?", "", True),
        },
        {"id": "bad-no-conversations", "image": "images/photos/rocket.jpg", "conversations": []},
    ]


def write_demo_dataset(
    out: str | os.PathLike, n_train: int = 64, n_val: int = 16, seed: int = 0, with_bad_records: bool = False
) -> dict:
    """Write the demo dataset under ``out``; returns counts and the manifest paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    _copy_photos(out)
    splits = {"train": _make_split(out, "train", n_train, rng), "val": _make_split(out, "val", n_val, rng)}
    if with_bad_records:
        bad = _planted_bad_records(out)
        # Spread through the split rather than at the end, so they land in different blocks.
        train = splits["train"]
        for k, record in enumerate(bad):
            train.insert(min(len(train), (k + 1) * max(1, len(train) // (len(bad) + 1))), record)
    summary: dict = {"out": str(out)}
    for split, records in splits.items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        summary[f"{split}_manifest"] = str(path)
        summary[f"n_{split}"] = len(records)
        summary[f"n_{split}_text_only"] = sum("image" not in r for r in records)
    summary["planted_bad"] = len(PLANTED_BAD_REASONS) if with_bad_records else 0
    return summary


__all__ = ["write_demo_dataset", "PHOTOS", "PLANTED_BAD_REASONS"]
