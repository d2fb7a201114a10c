"""The crop engine: grid choice, pixel-exact tiles, backends, levels and zoom ratio.

Decoding, modes and bad input live in ``test_zoom_decode.py``.
"""

from __future__ import annotations

import gc
import itertools
import math
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from dragonfly.config import ZoomConfig
from dragonfly.zoom import (
    RESIZERS,
    Crops,
    _bicubic,
    choose_grid,
    make_crops,
    select_best_resolution,
    stack_crops,
)

BICUBIC = Image.Resampling.BICUBIC
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera")


REPO = Path(__file__).resolve().parents[2]


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def sweep_sizes() -> list[tuple[int, int]]:
    """A few hundred (width, height): 1x1 up to 8000x100 and back, squares, thin strips, near-ties."""
    sides = sorted({round(1.5**k) for k in range(23)} | {100, 335, 336, 337, 672, 1344, 2016, 8000})
    sizes = set(itertools.product(sides[::2], sides[1::2])) | {(s, s) for s in sides}
    sizes |= {(8000, 100), (100, 8000), (1, 1), (1, 8000), (8000, 1), (2, 1), (1, 2), (200, 100), (100, 200)}
    return sorted(sizes)


# ---------------------------------------------------------------------------------------------
# Grid choice


def test_sweep_has_a_few_hundred_sizes():
    assert len(sweep_sizes()) >= 200


@pytest.mark.parametrize("R", [336, 28])
def test_released_rule_agrees_with_transformers(R):
    config = ZoomConfig(resolution=R, grid_rule="released")
    candidates_wh = [(c * R, r * R) for c, r in config.medium_grids]
    for width, height in sweep_sizes():
        # transformers speaks (height, width) in and out.
        hf_h, hf_w = hf_select_best_resolution((height, width), [(h, w) for w, h in candidates_wh])
        assert select_best_resolution((width, height), candidates_wh) == (hf_w, hf_h), (width, height)
        grid = choose_grid((width, height), config)
        assert (grid[0] * R, grid[1] * R) == (hf_w, hf_h), (width, height)


def test_released_rule_picks_the_square_grid_for_every_small_image():
    config = ZoomConfig(grid_rule="released")
    for size in [(100, 400), (400, 100), (30, 600), (640, 480), (600, 150)]:
        assert choose_grid(size, config) == (2, 2), size
    # Large enough to be downscaled into a candidate, the shape decides.
    assert choose_grid((400, 1800), config) == (1, 4)
    assert choose_grid((4000, 900), config) == (4, 1)


def test_aspect_rule_matches_its_definition():
    config = ZoomConfig(grid_rule="aspect")
    for width, height in sweep_sizes():
        distances = [abs(math.log(c / r) - math.log(width / height)) for c, r in config.medium_grids]
        best = min(distances)
        # Ties (within float noise) must go to the first of the tied grids.
        expected = config.medium_grids[next(i for i, d in enumerate(distances) if d - best < 1e-9)]
        assert choose_grid((width, height), config) == expected, (width, height)


@pytest.mark.parametrize(
    "size, grid",
    [
        ((200, 100), (2, 2)),  # exactly between 2x2 and 4x1: tie to the first
        ((100, 200), (2, 2)),
        ((201, 100), (4, 1)),
        ((100, 201), (1, 4)),
        ((100, 400), (1, 4)),
        ((640, 480), (2, 2)),
        ((8000, 100), (4, 1)),
    ],
)
def test_aspect_rule_cases(size, grid):
    assert choose_grid(size, ZoomConfig(grid_rule="aspect")) == grid


# ---------------------------------------------------------------------------------------------
# Pixels


def reassemble(tiles: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(columns*rows, 3, R, R) row-major tiles -> (rows*R, columns*R, 3) image."""
    columns, rows = grid
    R = tiles.shape[-1]
    return tiles.reshape(rows, columns, 3, R, R).transpose(0, 3, 1, 4, 2).reshape(rows * R, columns * R, 3)


def split_levels(crops: Crops, config: ZoomConfig) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for level, n in config.tiles_per_level().items():
        out[level] = crops.pixels[start : start + n]
        start += n
    return out


@pytest.mark.parametrize("name, R", [("chelsea", 336), ("rocket", 28), ("camera", 56)])
def test_pil_backend_is_pixel_exact_with_pil_resize(name, R):
    img = photo(name)
    config = ZoomConfig(resolution=R, backend="pil")
    crops = make_crops(img, config)
    levels = split_levels(crops, config)
    grids = {"low": (1, 1), "medium": crops.medium_grid, "high": crops.high_grid}
    for level, tiles in levels.items():
        columns, rows = grids[level]
        expected = np.asarray(img.resize((columns * R, rows * R), BICUBIC))
        np.testing.assert_array_equal(reassemble(tiles, grids[level]), expected, err_msg=level)


def test_output_shape_dtype_and_metadata_at_the_real_resolution():
    img = photo("coffee")  # 600x400
    crops = make_crops(img, ZoomConfig())
    assert crops.pixels.shape == (41, 3, 336, 336)
    assert crops.pixels.dtype == np.uint8
    # One buffer in channels-last order: (41, 336, 336, 3) in C order, viewed as (41, 3, 336, 336).
    assert crops.pixels.transpose(0, 2, 3, 1).flags.c_contiguous
    assert crops.native_size == (600, 400)
    assert (crops.medium_grid, crops.high_grid) == ((2, 2), (6, 6))
    assert crops.zoom_ratio == pytest.approx(2016 / 600)
    assert crops.pixels.nbytes == 13_886_208  # 13.9 MB of uint8 per sample


@pytest.mark.parametrize(
    "levels",
    [("low",), ("medium",), ("high",), ("low", "medium"), ("low", "high"), ("low", "medium", "high")],
)
def test_every_level_subset_gives_its_tiles_in_order(levels):
    img = photo("chelsea")
    R = 28
    full_config = ZoomConfig(resolution=R, backend="pil")
    config = ZoomConfig(resolution=R, levels=levels, backend="pil")
    full = split_levels(make_crops(img, full_config), full_config)
    crops = make_crops(img, config)
    assert crops.pixels.shape == (config.n_tiles, 3, R, R)
    np.testing.assert_array_equal(crops.pixels, np.concatenate([full[level] for level in config.levels]))
    # Grids and zoom ratio do not depend on which levels are on.
    assert crops.high_grid == (6, 6) and crops.zoom_ratio == pytest.approx(6 * R / 451)


def test_zoom_ratio_uses_the_high_grid_of_a_tall_image():
    img = Image.new("RGB", (500, 3000), (10, 20, 30))
    crops = make_crops(img, ZoomConfig(resolution=28, levels=("low",)))
    assert crops.medium_grid == (1, 4) and crops.high_grid == (3, 12)
    assert crops.zoom_ratio == pytest.approx(12 * 28 / 3000)


def test_zoom_from_low_resolution_resizes_the_low_image():
    img = photo("astronaut")
    R = 28
    config = ZoomConfig(resolution=R, backend="pil", zoom_source="low")
    levels = split_levels(make_crops(img, config), config)
    low = img.resize((R, R), BICUBIC)
    np.testing.assert_array_equal(reassemble(levels["low"], (1, 1)), np.asarray(low))
    np.testing.assert_array_equal(
        reassemble(levels["medium"], (2, 2)), np.asarray(low.resize((2 * R, 2 * R), BICUBIC))
    )
    np.testing.assert_array_equal(
        reassemble(levels["high"], (6, 6)), np.asarray(low.resize((6 * R, 6 * R), BICUBIC))
    )
    native = split_levels(make_crops(img, ZoomConfig(resolution=R, backend="pil")), config)
    assert not np.array_equal(levels["high"], native["high"])  # the ablation really differs


def test_grid_rule_changes_the_tiles():
    # Smaller than every candidate (56x56, 28x112, 112x28): the released rule cannot tell them apart.
    img = Image.fromarray(skimage.data.astronaut()).resize((12, 48))
    released = make_crops(img, ZoomConfig(resolution=28, grid_rule="released"))
    aspect = make_crops(img, ZoomConfig(resolution=28, grid_rule="aspect"))
    assert (released.medium_grid, aspect.medium_grid) == ((2, 2), (1, 4))
    assert aspect.high_grid == (3, 12)
    np.testing.assert_array_equal(released.pixels[0], aspect.pixels[0])  # same low tile
    assert not np.array_equal(released.pixels[1:], aspect.pixels[1:])


# ---------------------------------------------------------------------------------------------
# The fast backend's bound against Pillow: max |diff| <= 3 and mean |diff| < 0.01 per resize.


def sharp_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    checker4 = ((np.indices((120, 200)) // 4).sum(0) % 2 * 255).astype(np.uint8)
    lines = np.zeros((300, 220), np.uint8)
    lines[::5] = 255
    lines[:, ::7] = 128
    return {
        "noise": rng.integers(0, 256, (300, 451, 3), dtype=np.uint8),
        "binary_noise": rng.integers(0, 2, (200, 150, 3), dtype=np.uint8) * 255,
        "checker_4px": np.repeat(checker4[..., None], 3, axis=2),
        "lines": np.repeat(lines[..., None], 3, axis=2),
        "blocks": np.kron(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), np.ones((37, 23, 1), np.uint8)),
    }


def resize_diff(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """|fast - pil| of one resize, (h, w, 3)."""
    pil, fast = RESIZERS["pil"], RESIZERS["torch"]
    expected = pil.hwc(pil.resize(pil.prepare(img), size)).astype(np.int16)
    return np.abs(fast.hwc(fast.resize(fast.prepare(img), size)).astype(np.int16) - expected)


def assert_within_bound(img: Image.Image, size: tuple[int, int], label: str):
    diff = resize_diff(img, size)
    assert diff.max() <= 3 and diff.mean() < 0.01, (
        f"{label} -> {size}: max {diff.max()}, mean {diff.mean():.4f}"
    )


def sharp_targets(img: Image.Image) -> list[tuple[int, int]]:
    # Both of Pillow's pass orders (vertical first when the height shrinks by more than twice as many
    # pixels as the width), one axis up and the other down, plain up/down scaling, tiny outputs.
    w, h = img.size
    return [
        (2 * w, h // 3),
        (w + 7, h - 40),
        (w // 2, h // 5),
        (w // 5, h // 2),
        (3 * w, 3 * h),
        (28, 28),
        (2016, 2016),
    ]


# Targets of the real config (R=336): low, the three medium and three high grids.
TARGETS_336 = [(336, 336), (672, 672), (336, 1344), (1344, 336), (2016, 2016), (1008, 4032), (4032, 1008)]


@pytest.mark.parametrize("name", PHOTOS)
def test_fast_backend_within_bound_on_photos(name):
    img = photo(name)
    for size in TARGETS_336:
        assert_within_bound(img, size, name)


@pytest.mark.parametrize("name", list(sharp_images()))
def test_fast_backend_within_bound_on_sharp_edges(name):
    img = Image.fromarray(sharp_images()[name])
    for size in sharp_targets(img):
        assert_within_bound(img, size, name)


def test_fast_backend_on_a_one_pixel_checkerboard_rounds_ties_differently():
    """The one image where the mean bound fails: shrinking a 1-px checkerboard lands many pixels on
    exact .5 values, which Pillow (22-bit weights) and torch (16-bit weights) round apart. Never by
    more than one grey level."""
    checker = (np.indices((120, 200)).sum(0) % 2 * 255).astype(np.uint8)
    img = Image.fromarray(np.repeat(checker[..., None], 3, axis=2))
    worst_mean = 0.0
    for size in sharp_targets(img):
        diff = resize_diff(img, size)
        assert diff.max() <= 1, size
        worst_mean = max(worst_mean, diff.mean())
    assert 0.01 < worst_mean < 0.5  # documented in docs/zoom.md


def test_fast_backend_follows_pillows_pass_order_on_large_images():
    # A big photo stretched tall: the 2016x2016 target shrinks the height and grows the width,
    # where torch's default horizontal-first order would be off by more than the bound.
    img = photo("hubble_deep_field").resize((1400, 3000), BICUBIC)
    for size in [(2016, 2016), (1344, 336), (336, 336)]:
        assert_within_bound(img, size, "hubble 1400x3000")


def test_backends_agree_end_to_end():
    img = photo("rocket")
    pil = make_crops(img, ZoomConfig(resolution=56, backend="pil"))
    fast = make_crops(img, ZoomConfig(resolution=56, backend="torch"))
    diff = np.abs(pil.pixels.astype(np.int16) - fast.pixels.astype(np.int16))
    assert diff.max() <= 3 and diff.mean() < 0.01
    assert (pil.medium_grid, pil.high_grid, pil.native_size) == (
        fast.medium_grid,
        fast.high_grid,
        fast.native_size,
    )


def test_crops_go_into_a_given_buffer_and_a_wrong_buffer_is_refused():
    img = photo("coffee")
    config = ZoomConfig(resolution=28)
    batch = np.zeros((2, config.n_tiles, 28, 28, 3), np.uint8)
    crops = make_crops(img, config, out=batch[1])
    assert np.shares_memory(crops.pixels, batch[1])
    np.testing.assert_array_equal(batch[1].transpose(0, 3, 1, 2), make_crops(img, config).pixels)
    assert not batch[0].any()
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        make_crops(img, config, out=np.zeros((config.n_tiles, 3, 28, 28), np.uint8))


@pytest.mark.parametrize("size_hw", [(2016, 2016), (336, 1344), (100, 37)])
def test_channels_last_resize_equals_torch_interpolate(size_hw):
    """The fast backend calls the ATen op behind ``F.interpolate`` with a channels-last output; a
    torch upgrade that changed the op would show here."""
    native = RESIZERS["torch"].prepare(photo("coffee"))
    ours = _bicubic(native, size_hw)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    reference = F.interpolate(native, size=size_hw, mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(ours, reference)


def test_stack_crops_gives_the_same_batch_from_either_layout():
    config = ZoomConfig(resolution=28)
    crops = [make_crops(photo(name), config).pixels for name in ("coffee", "rocket")]
    batch = stack_crops(crops)
    assert batch.shape == (2, config.n_tiles, 3, 28, 28) and batch.dtype == torch.uint8
    expected = np.stack([np.ascontiguousarray(c) for c in crops])
    np.testing.assert_array_equal(batch.numpy(), expected)
    np.testing.assert_array_equal(stack_crops([torch.from_numpy(c) for c in expected]).numpy(), expected)


def test_stack_crops_views_read_only_crops_that_lie_back_to_back_and_copies_the_rest():
    """The data pipeline's samples are read-only views of one block in the object store: a batch of
    consecutive ones is that block's memory, not a copy. Anything else is copied: crops out of order
    or apart, and writable memory (read-only views of it too), which its owner may change while the
    batch lives."""
    config = ZoomConfig(resolution=28)
    hwc = np.stack(
        [
            make_crops(photo(name), config).pixels.transpose(0, 2, 3, 1)
            for name in ("coffee", "rocket", "astronaut")
        ]
    )
    block = np.frombuffer(hwc.tobytes(), np.uint8).reshape(hwc.shape)  # read-only, like an Arrow buffer
    rows = [row.transpose(0, 3, 1, 2) for row in block]  # each (n_tiles, 3, R, R)
    expected = block.transpose(0, 1, 4, 2, 3)

    batch = stack_crops(rows[1:])
    address, want = rows[1].ctypes.data, expected[1:].copy()
    del block, rows, expected, hwc
    gc.collect()
    assert batch.data_ptr() == address  # no copy, and the batch keeps the buffer alive:
    np.testing.assert_array_equal(batch.numpy(), want)
    assert batch.permute(0, 1, 3, 4, 2).is_contiguous()  # channels-last, as a copy would be

    block = np.frombuffer(want.transpose(0, 1, 3, 4, 2).tobytes(), np.uint8).reshape(2, -1, 28, 28, 3)
    rows, expected = [row.transpose(0, 3, 1, 2) for row in block], block.transpose(0, 1, 4, 2, 3)
    writable = block.copy()
    read_only_view = writable.view()
    read_only_view.flags.writeable = False
    for copied, want in (
        (rows[::-1], expected[::-1]),
        ([rows[0]] * 2, expected[[0, 0]]),
        ([row.transpose(0, 3, 1, 2) for row in writable], expected),  # back to back, but writable
        ([row.transpose(0, 3, 1, 2) for row in read_only_view], expected),  # ... behind a read-only view
    ):
        batch = stack_crops(copied)
        assert batch.data_ptr() not in {row.ctypes.data for row in copied}
        np.testing.assert_array_equal(batch.numpy(), want)


_FAULTS_PER_CROP = """
import io, resource, sys
import numpy as np
from PIL import Image
from dragonfly.config import ZoomConfig
from dragonfly.zoom import keep_freed_memory, make_crops

assert keep_freed_memory()
rng = np.random.default_rng(0)
images = []
for w, h in ((1600, 1200), (2000, 800), (700, 1400), (1200, 1200)):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, "PNG")
    images.append(buf.getvalue())
config = ZoomConfig(resolution=336)
for data in images * 3:  # the first images grow the heap to its peak
    make_crops(data, config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for data in images * 4:
    make_crops(data, config)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 16)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_stops_each_crop_faulting_its_temporaries_in_anew():
    """With the allocator keeping freed memory, an image's tens of MB of temporaries (the decoded
    image, a 12 MB high-level resize, the 13.9 MB crops) reuse the previous images' pages: next to
    no page faults per image. glibc's defaults vary from run to run (0 to 5,400 per image measured
    here, usually hundreds to thousands), so only the kept side is asserted. In a process of its
    own: the setting is process-wide."""
    run = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CROP, "keep"], cwd=REPO, capture_output=True, text=True, check=True
    )
    kept = float(run.stdout.split()[-1])
    assert kept < 300, kept  # a late growth of the heap, once (~12 MB over 16 images), at most
