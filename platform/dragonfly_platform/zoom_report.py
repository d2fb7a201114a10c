"""The paper's Figure 4 for any manifest: how far the high-resolution crops zoom into each image.

Zoom ratio = longest side of the high-resolution image (the high grid times R) / longest side of the
native image, with the grid chosen by the crop engine's own rule (``dragonfly.zoom.choose_grid``).
Only image headers are read (Pillow opens lazily; no pixel is decoded), in Ray tasks with threaded
I/O, so a manifest of millions of ``s3://`` images costs one small ranged read per image.

Outputs in ``out_dir``: ``zoom_ratios.csv`` (one row per image), ``zoom_ratio_cdf.png`` (the CDF with
2x and 4x marks) and ``zoom_report.json`` (counts, quantiles, share zoomed >= 2x and >= 4x).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dragonfly.config import ZoomConfig
from dragonfly.zoom import zoom_grids
from dragonfly_platform.manifest import read_manifest
from dragonfly_platform.storage import StorageConfig, join, parent

# EXIF orientations that swap width and height (the crop engine applies them before choosing a grid).
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112
HEADER_BLOCK_BYTES = 64 * 1024


def header_size(url: str, storage: StorageConfig) -> tuple[int, int]:
    """(width, height) as the crop engine sees it (EXIF orientation applied), from the header only."""
    with storage.open(url, "rb", block_size=HEADER_BLOCK_BYTES) as f, Image.open(f) as image:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return width, height


def read_sizes(
    batch: pd.DataFrame, *, storage: StorageConfig, zoom: ZoomConfig, threads: int
) -> pd.DataFrame:
    """Ray stage: add width, height, high grid, zoom ratio (NaN and ``error`` for unreadable images)."""
    urls = batch["url"].tolist()
    results: list[dict[str, Any]] = [{} for _ in urls]

    def measure(i: int) -> None:
        try:
            size = header_size(urls[i], storage)
        except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError) as err:
            results[i] = {"error": f"{type(err).__name__}: {err}"}
            return
        if min(size) <= 0:
            results[i] = {"error": f"zero-size image {size}"}
            return
        _, high, ratio = zoom_grids(size, zoom)
        results[i] = {
            "width": size[0],
            "height": size[1],
            "high_grid": f"{high[0]}x{high[1]}",
            "zoom_ratio": ratio,
        }

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        list(pool.map(measure, range(len(urls))))
    extra = pd.DataFrame(
        results, columns=["width", "height", "high_grid", "zoom_ratio", "error"], index=batch.index
    )
    return pd.concat([batch, extra], axis=1)


def run_zoom_report(
    manifest: str,
    out_dir: str,
    *,
    zoom: ZoomConfig | None = None,
    image_root: str | None = None,
    storage: StorageConfig | None = None,
    threads: int = 16,
) -> dict[str, Any]:
    """Measure every image of ``manifest``; write the CSV, the CDF plot and the summary JSON."""
    import ray.data

    zoom = zoom or ZoomConfig()
    storage = storage or StorageConfig()
    root = image_root if image_root is not None else parent(manifest)
    items = [
        {"id": r.id, "url": join(root, r.image)} for r in read_manifest(manifest, storage) if r.has_image
    ]
    if not items:
        raise ValueError(f"{manifest} has no image records")
    table = (
        ray.data.from_items(items)
        .map_batches(
            read_sizes,
            fn_kwargs={"storage": storage, "zoom": zoom, "threads": threads},
            batch_format="pandas",
            batch_size=256,
        )
        .to_pandas()
    )
    os.makedirs(out_dir, exist_ok=True)
    table.to_csv(os.path.join(out_dir, "zoom_ratios.csv"), index=False)
    ratios = table["zoom_ratio"].dropna().to_numpy(dtype=float)
    summary = summarize(ratios, unreadable=int(table["error"].notna().sum()), zoom=zoom)
    summary["manifest"] = manifest
    plot_cdf(ratios, os.path.join(out_dir, "zoom_ratio_cdf.png"), title=os.path.basename(manifest))
    with open(os.path.join(out_dir, "zoom_report.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def summarize(ratios: np.ndarray, *, unreadable: int, zoom: ZoomConfig) -> dict[str, Any]:
    if len(ratios) == 0:
        raise ValueError("no readable images to report on")
    return {
        "images": int(len(ratios)),
        "unreadable": unreadable,
        "resolution": zoom.resolution,
        "grid_rule": zoom.grid_rule,
        "share_at_least_2x": float(np.mean(ratios >= 2)),
        "share_at_least_4x": float(np.mean(ratios >= 4)),
        "quantiles": {f"p{q}": float(np.percentile(ratios, q)) for q in (5, 25, 50, 75, 95)},
    }


def plot_cdf(ratios: np.ndarray, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    values = np.sort(ratios)
    cdf = np.arange(1, len(values) + 1) / len(values)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.step(values, cdf, where="post", color="tab:blue")
    for mark, colour in ((2, "tab:orange"), (4, "tab:red")):
        share = float(np.mean(ratios >= mark))
        ax.axvline(
            mark, color=colour, linestyle="--", label=f"{mark}x: {share:.0%} zoomed at least this much"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("zoom ratio (high-res longest side / native longest side)")
    ax.set_ylabel("fraction of images")
    ax.set_title(f"Zoom ratio CDF {title}".strip())
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["header_size", "run_zoom_report", "summarize", "plot_cdf"]
