"""The multi-resolution zoom-in crop engine: one image in, the crops the vision encoder sees out.

For an image and a ``ZoomConfig`` (R = ``config.resolution``)::

    low     the whole image stretched to R x R                          1 tile
    medium  the image stretched to a grid of (columns, rows) tiles      e.g. 2x2, 1x4 or 4x1
    high    the medium grid scaled by ``high_scale``                    e.g. 6x6, 3x12 or 12x3

Every level is resized directly from the native image with bicubic interpolation and no padding, as
the released Dragonfly code does (``zoom_source="low"`` derives medium and high from the low image
instead: the paper's Table 3). Tiles come out row-major, in the order [low] + medium + high, as one
``uint8`` array of shape ``(n_tiles, 3, R, R)`` in one contiguous buffer, channels-last: what both
backends resize into (planar tiles would cost a byte-wise deinterleave as long as the largest
resize). Normalisation, and the planar float layout, are left to the training device, so uint8
crosses the wire (13.9 MB per sample at R=336 instead of 55.5 MB of float32).

Two grid rules (``config.grid_rule``), both over ``config.medium_grids``:

- ``released``: LLaVA-NeXT's ``select_best_resolution`` on the grids' pixel sizes, ties to the first
  candidate: what the released code runs. Every candidate has the same area, so an image that fits
  inside the square one (both sides <= 2R) loses nothing there, and the first grid (2x2) wins
  whatever the image's shape.
- ``aspect``: the grid whose aspect ratio is closest to the image's in log space (the paper's text).

Two resize backends (``config.backend``) with one interface: ``pil`` is pixel-exact
``PIL.Image.resize(..., BICUBIC)``; ``torch`` is torch's uint8 antialiased bicubic on channels-last
tensors, about 5x faster and within 3 grey levels of ``pil`` (mean absolute difference under 0.01).

Bad input raises ``ImageError`` with a machine-readable ``reason``; see ``docs/zoom.md``.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from dragonfly.config import ZoomConfig

Size = tuple[int, int]  # (width, height) in pixels, or (columns, rows) for a grid

REASONS = ("empty", "not_an_image", "truncated", "too_many_pixels", "zero_size", "decode_failed")
WHITE = (255, 255, 255, 255)


class ImageError(ValueError):
    """An image the engine cannot use. ``reason`` is one of ``REASONS``; ``source`` names the record."""

    def __init__(self, source: str, reason: str, detail: str):
        assert reason in REASONS, reason
        self.source = source
        self.reason = reason
        self.detail = detail
        super().__init__(f"{source}: {reason}: {detail}")

    def __reduce__(self):
        # Rebuilt from its fields when it crosses a process boundary (Ray workers pickle errors).
        return type(self), (self.source, self.reason, self.detail)


@dataclass(frozen=True)
class Crops:
    """The crops of one image and how they were made."""

    # (n_tiles, 3, R, R) uint8, tiles [low] + medium + high, row-major. One contiguous buffer in
    # channels-last order: ``pixels.transpose(0, 2, 3, 1)`` is the C-contiguous (n_tiles, R, R, 3).
    pixels: np.ndarray
    medium_grid: Size  # (columns, rows), chosen even when the medium level is disabled
    high_grid: Size  # (columns, rows) = medium_grid * high_scale
    native_size: Size  # (width, height) after the EXIF orientation is applied
    zoom_ratio: float  # longest side of the high-resolution image / longest side of the native image


# ---------------------------------------------------------------------------------------------
# Grid choice


def select_best_resolution(original_size: Size, possible_resolutions: list[Size]) -> Size:
    """LLaVA-NeXT's rule, in the released Dragonfly code's ``(width, height)`` order.

    Picks the candidate that keeps the most of the image's pixels when the image is scaled to fit
    inside it (never counting more than the image has), then the one that wastes the least area;
    ties go to the first candidate. ``transformers.image_processing_utils.select_best_resolution``
    computes the same thing in ``(height, width)`` order.
    """
    width, height = original_size
    best, best_effective, best_wasted = None, 0, math.inf
    for cand_width, cand_height in possible_resolutions:
        scale = min(cand_width / width, cand_height / height)
        # int() truncation and float scale exactly as upstream: the tests compare against it.
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_width * cand_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (cand_width, cand_height), effective, wasted
    return best


def choose_grid(native_size: Size, config: ZoomConfig) -> Size:
    """The medium grid ``(columns, rows)`` for an image of ``native_size`` = (width, height).

    The high grid is always this grid scaled by ``config.high_scale``.
    """
    grids = config.medium_grids
    if config.grid_rule == "released":
        pixel_sizes = [(c * config.resolution, r * config.resolution) for c, r in grids]
        return grids[pixel_sizes.index(select_best_resolution(native_size, pixel_sizes))]
    return min(grids, key=lambda grid: _aspect_distance(grid, native_size))


def _aspect_distance(grid: Size, size: Size) -> Fraction:
    """exp(|log(columns/rows) - log(width/height)|), as an exact fraction: an image exactly between two
    grids (w/h = 2, between 2x2 and 4x1) ties, and ``min`` gives the tie to the first grid."""
    (columns, rows), (width, height) = grid, size
    a, b = columns * height, rows * width
    return Fraction(max(a, b), min(a, b))


def high_grid_of(medium_grid: Size, config: ZoomConfig) -> Size:
    return (medium_grid[0] * config.high_scale, medium_grid[1] * config.high_scale)


def zoom_grids(native_size: Size, config: ZoomConfig) -> tuple[Size, Size, float]:
    """``(medium grid, high grid, zoom ratio)`` for an image of ``native_size`` = (width, height).

    The zoom ratio is the high-resolution image's longest side over the native image's (the paper's
    Figure 4): above 1 the high level zooms in past the native resolution.
    """
    medium_grid = choose_grid(native_size, config)
    high_grid = high_grid_of(medium_grid, config)
    return medium_grid, high_grid, max(high_grid) * config.resolution / max(native_size)


# ---------------------------------------------------------------------------------------------
# Decoding


def open_image(
    image: bytes | bytearray | memoryview | Image.Image, config: ZoomConfig, *, source: str
) -> Image.Image:
    """Decode ``image`` to an RGB ``PIL.Image`` with its EXIF orientation applied, or raise ``ImageError``.

    The pixel count is checked against ``config.max_image_pixels`` from the header, before anything
    is decoded. Truncated files raise (``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False).
    """
    data = None
    if isinstance(image, Image.Image):
        img = image
    else:
        data = bytes(image)
        if not data:
            raise ImageError(source, "empty", "no bytes")
        try:
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as err:
            raise ImageError(source, "too_many_pixels", str(err)) from None
        except UnidentifiedImageError:
            raise _unidentified(source, data) from None
        except Exception as err:
            raise _decode_error(source, err, data) from None

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(source, "zero_size", f"image is {width}x{height}")
    if width * height > config.max_image_pixels:
        raise ImageError(
            source,
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels > {config.max_image_pixels}",
        )
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
        img = _apply_exif_orientation(img)
        return _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageError(source, "too_many_pixels", str(err)) from None
    except Exception as err:  # never a bare Pillow/zlib/struct traceback
        raise _decode_error(source, err, data) from None


# Formats whose truncation we can tell from the bytes: (leading signatures, what the file ends with).
_ENDINGS = {
    "PNG": ((b"\x89PNG\r\n\x1a\n",), b"IEND\xaeB`\x82"),
    "JPEG": ((b"\xff\xd8\xff",), b"\xff\xd9"),
    "GIF": ((b"GIF87a", b"GIF89a"), b";"),
}


def _format_of(data: bytes) -> str | None:
    for name, (signatures, _) in _ENDINGS.items():
        if data.startswith(signatures):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _looks_truncated(data: bytes) -> bool:
    fmt = _format_of(data)
    if fmt == "WEBP":  # RIFF says how long the file is
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return fmt is not None and not data.rstrip(b"\0").endswith(_ENDINGS[fmt][1])


def _unidentified(source: str, data: bytes) -> ImageError:
    """Pillow refused the header. Say why when the bytes show it: a known format cut short, or a
    PNG whose header declares zero pixels (Pillow will not open those)."""
    fmt = _format_of(data)
    if fmt is None:
        return ImageError(source, "not_an_image", f"{len(data)} bytes in no format Pillow reads")
    if fmt == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:
            return ImageError(source, "zero_size", f"PNG header declares {width}x{height}")
    if _looks_truncated(data):
        return ImageError(source, "truncated", f"{fmt} file of {len(data)} bytes ends inside its header")
    return ImageError(source, "decode_failed", f"{fmt} header cannot be read")


def _decode_error(source: str, err: Exception, data: bytes | None) -> ImageError:
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, EOFError) or "truncated" in str(err).lower() or (data and _looks_truncated(data)):
        return ImageError(source, "truncated", text)
    return ImageError(source, "decode_failed", text)


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    # Checked first because exif_transpose copies the image even when there is nothing to do.
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB. Transparency is composited onto white; 16/32-bit integer grey keeps
    its tones (its top 8 bits), where Pillow's own ``convert("RGB")`` clips it to white."""
    mode = img.mode
    if mode == "RGB" and not img.has_transparency_data:  # an RGB PNG may name one colour transparent
        return img
    if mode.startswith("I;16") or mode == "I":
        # "I" is how Pillow represents 16-bit grey from some formats: read as unsigned 16 bits.
        grey16 = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        return Image.fromarray((grey16 >> 8).astype(np.uint8), "L").convert("RGB")
    if "A" in mode or "a" in mode or img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, WHITE), rgba).convert("RGB")
    return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Resize backends: prepare(PIL RGB image) -> source; resize(source, (w, h)) -> source; hwc(source)
# -> (h, w, 3) uint8 array. A "source" is whatever the backend resizes fastest from.


class PilResizer:
    """``PIL.Image.resize(..., BICUBIC)``: the released code's resize, the reference for the others."""

    def prepare(self, img: Image.Image) -> Image.Image:
        return img

    def resize(self, src: Image.Image, size: Size) -> Image.Image:
        return src.resize(size, Image.Resampling.BICUBIC)

    def hwc(self, src: Image.Image) -> np.ndarray:
        return np.asarray(src)  # (h, w, 3)


class TorchResizer:
    """torch's uint8 antialiased bicubic on channels-last tensors (Pillow's a = -0.5 kernel).

    The output is channels-last too: ``F.interpolate`` always returns a planar tensor, and its
    interleaved-to-planar repacking costs twice the resize itself (~12 of ~18 ms at 2016x2016 on one
    core), so the ATen op is called with a channels-last ``out=`` (the same kernel; a unit test
    holds it pixel-equal to ``F.interpolate``).

    Both libraries resize in two 1-D passes and round to uint8 in between, so the pass order matters
    (up to ~20 grey levels where an upscaling pass overshoots and is clipped before a downscaling
    one). torch always runs the horizontal pass first; Pillow >= 13 runs the vertical pass first when
    the height shrinks by more than twice as many pixels as the width does. We follow Pillow's order.
    """

    def __init__(self):
        self.pillow_vertical_first = int(Image.__version__.split(".")[0]) >= 13

    def prepare(self, img: Image.Image) -> torch.Tensor:
        hwc = _read_only_tensor(np.asarray(img))  # (H, W, 3)
        return hwc.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last in memory

    def resize(self, src: torch.Tensor, size: Size) -> torch.Tensor:
        width, height = size
        in_height, in_width = src.shape[2:]
        shrink_h, shrink_w = in_height - height, in_width - width
        if self.pillow_vertical_first and shrink_h > 0 and shrink_h > 2 * shrink_w:
            src = _bicubic(src, (height, in_width))
        return _bicubic(src, (height, width))

    def hwc(self, src: torch.Tensor) -> np.ndarray:
        return src[0].permute(1, 2, 0).numpy()  # (h, w, 3), contiguous


def _bicubic(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) channels-last uint8 -> (1, 3, *size_hw) channels-last uint8."""
    if tuple(x.shape[2:]) == size_hw:
        return x
    out = torch.empty((1, 3, *size_hw), dtype=torch.uint8, memory_format=torch.channels_last)
    return torch.ops.aten._upsample_bicubic2d_aa.out(x, list(size_hw), False, None, None, out=out)


RESIZERS = {"pil": PilResizer(), "torch": TorchResizer()}


# ---------------------------------------------------------------------------------------------
# Crops


def make_crops(
    image: bytes | Image.Image,
    config: ZoomConfig,
    *,
    source: str = "<image>",
    out: np.ndarray | None = None,
) -> Crops:
    """Decode (if bytes), choose the grid, resize each enabled level and tile it.

    ``source`` names the image (record id, path) in any ``ImageError``. ``out``: where to write the
    tiles, a C-contiguous uint8 array of shape ``(n_tiles, R, R, 3)`` (e.g. a slice of a batch
    buffer); by default a new one. ``Crops.pixels`` is a view of it.
    """
    img = open_image(image, config, source=source)
    native_size = img.size
    medium_grid, high_grid, zoom_ratio = zoom_grids(native_size, config)
    R = config.resolution
    grids = {"low": (1, 1), "medium": medium_grid, "high": high_grid}

    resizer = RESIZERS[config.backend]
    native = resizer.prepare(img)
    zoom_from = native
    if config.zoom_source == "low":
        # The paper's Table 3: medium and high are zoomed in from the R x R image, not the native one.
        zoom_from = resizer.resize(native, (R, R))

    tiles = _tile_buffer(out, (config.n_tiles, R, R, 3))
    start = 0
    for level in config.levels:
        columns, rows = grids[level]
        src = native if level == "low" else zoom_from
        resized = resizer.hwc(resizer.resize(src, (columns * R, rows * R)))  # (rows*R, columns*R, 3)
        _tile(resized, (columns, rows), R, tiles[start : start + columns * rows])
        start += columns * rows
    assert start == config.n_tiles

    pixels = tiles.transpose(0, 3, 1, 2)  # (n_tiles, 3, R, R), channels-last in memory
    return Crops(pixels, medium_grid, high_grid, native_size, zoom_ratio)


def keep_freed_memory(trim_threshold: int = 256 << 20) -> bool:
    """Have this process's C allocator keep the memory that cropping frees, for the next image.

    ``make_crops`` allocates tens of MB of temporaries per image (the decoded image, each level's
    resize: 12 MB for a 2016 x 2016 high level). glibc's malloc serves blocks that large with fresh
    ``mmap`` s, or trims them off the heap once freed, so each image faults its temporaries in anew
    page by page: usually hundreds to thousands of page faults per image at R=336 (up to 5,400
    measured; glibc's sliding threshold sometimes settles and faults next to none), which took the
    crop engine from ~16.5 to 21-24 ms of CPU per image on the 2-core box (docs/benchmarks.md).
    This sets the mmap threshold to 32 MiB (the cap of glibc's own sliding threshold; larger blocks,
    e.g. a decoded image over ~11 megapixels, are still mapped afresh) and trims the heap only past
    ``trim_threshold`` bytes free. The price: the process keeps its peak heap (tens of MB while
    cropping; free heap up to ``trim_threshold``) instead of returning it to the system.

    Process-wide, so it is the caller's choice: the data pipeline's ``make_crop_rows`` calls it in
    the process that runs it. Returns False, changing nothing, where the C library is not glibc.
    """
    import ctypes
    import os

    try:
        os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not glibc (musl, macOS)
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(
        libc.mallopt(m_trim_threshold, trim_threshold)
    )


def _tile_buffer(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.uint8)
    if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    return out


def _tile(hwc: np.ndarray, grid: Size, R: int, out: np.ndarray) -> None:
    """Cut ``hwc`` (rows*R, columns*R, 3) into ``out`` (columns*rows, R, R, 3), row-major.

    One copy of whole tile rows (R*3 contiguous bytes each); making planar tiles would deinterleave
    every byte, ~3x slower. torch's strided copy does it ~35% faster than ``np.copyto`` (at 2016x2016
    on one core: ~1.6 against ~2.5 ms, a plain memcpy ~1.2 ms).
    """
    columns, rows = grid
    # (rows, R, columns, R*3) -> (rows, columns, R, R*3)
    tiles = _read_only_tensor(hwc).view(rows, R, columns, R * 3).permute(0, 2, 1, 3)
    torch.from_numpy(out).view(rows, columns, R, R * 3).copy_(tiles)


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, for arrays the caller only reads (Pillow hands out
    read-only buffers, which torch warns about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def stack_crops(crops: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """Stack samples' crops, each uint8 (n_tiles, 3, R, R), into one (n_images, n_tiles, 3, R, R) tensor.

    The copy runs in channels-last order, so crops from ``make_crops`` (and read-only views of the
    data pipeline's buffers) are copied as whole rows, and the result is channels-last as well.
    Planar input works too (one deinterleaving copy).

    Read-only crops of read-only memory that lie back to back in one buffer, in order (consecutive
    rows of a data pipeline block in Ray's object store), are not copied: the batch is a view of
    that buffer, which it keeps alive. The copy cost the consumer ~3 ms of CPU per 14 MB sample on
    two cores (fresh pages to fault in, then a memcpy). torch does not know such a batch is
    read-only: the model only reads its pixels, and nothing may write into them in place.
    """
    hwc = [np.asarray(c).transpose(0, 2, 3, 1) for c in crops]  # each (n_tiles, R, R, 3)
    adjacent = _back_to_back(hwc) if hwc else None
    if adjacent is not None:
        return _read_only_tensor(adjacent).permute(0, 1, 4, 2, 3)
    return torch.from_numpy(np.stack(hwc)).permute(0, 1, 4, 2, 3)


def _back_to_back(arrays: list[np.ndarray]) -> np.ndarray | None:
    """``arrays`` as one read-only ``(n, *shape)`` view when they are read-only, C-contiguous views
    of one read-only buffer lying back to back in order; else None. Writable memory is left out,
    read-only views of it too: its owner may change or reuse it (the crop workers reuse theirs)
    while a batch still refers to it."""
    first = arrays[0]
    # numpy points a view's ``base`` at the array that owns its memory, or at the array made over a
    # foreign buffer (np.frombuffer over an Arrow buffer, as the pipeline's rows are): that array
    # is writable exactly when the memory may still change under the batch.
    base = first.base
    if (
        base is None
        or (isinstance(base, np.ndarray) and base.flags.writeable)
        or any(
            a.flags.writeable
            or not a.flags.c_contiguous
            or a.base is not base
            or a.shape != first.shape
            or a.dtype != first.dtype
            for a in arrays
        )
    ):
        return None
    start = first.__array_interface__["data"][0]
    if any(a.__array_interface__["data"][0] != start + i * first.nbytes for i, a in enumerate(arrays)):
        return None
    # Every row lies inside the common base's memory, which the view keeps alive through ``first``.
    return np.lib.stride_tricks.as_strided(
        first, shape=(len(arrays), *first.shape), strides=(first.nbytes, *first.strides), writeable=False
    )


__all__ = [
    "REASONS",
    "Crops",
    "ImageError",
    "PilResizer",
    "TorchResizer",
    "RESIZERS",
    "choose_grid",
    "high_grid_of",
    "keep_freed_memory",
    "make_crops",
    "open_image",
    "select_best_resolution",
    "stack_crops",
    "zoom_grids",
]
