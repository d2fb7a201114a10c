"""Per-core preprocessing throughput: the crop engine against the pipelines it replaces.

    python benchmarks/preprocess.py [--repeats 5 --out benchmarks/results/preprocess.json]

Real photographs (scikit-image's bundled samples, JPEG-encoded at quality 90; decode included) in
two groups: "<=1000 px" (the samples at native size, 300-1000 px, and shrunk to 200 px) and
"1000-4000 px" (the samples enlarged to 2000 and 4000 px on the long side). For each group, side by
side in one run, one torch thread (per core):

    engine (torch)   dragonfly.zoom.make_crops with the default fast backend -> uint8 (41, 3, 336, 336)
    engine (pil)     the same with the pixel-exact Pillow backend
    released         a re-creation of the released Dragonfly pipeline: Pillow resizes, then one
                     CLIPImageProcessor call per crop -> float32 (41, 3, 336, 336)
    llava_next       transformers' LlavaNextImageProcessor with the high-res grid pinpoints
                     (2016x2016, 1008x4032, 4032x1008) -> float32 (37, 3, 336, 336)
    floor            decode + one bicubic resize (torch) to the high-res size + writing its bytes

Each repeat runs every pipeline over the whole group (interleaved, so load on a shared machine hits
all alike); images/s is the group size over the median repeat, from the process's CPU time (one
thread, so CPU time is the core's time even when the machine is shared) and from wall time.

Targets (issue 2, section 4) for the default backend on images up to 1000 px: >= 75 images/s per
core (aim 100), >= 7x llava_next and >= 5x released. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import skimage.data
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessor, LlavaNextImageProcessor

from dragonfly.config import ZoomConfig
from dragonfly.zoom import RESIZERS, choose_grid, high_grid_of, make_crops, open_image, select_best_resolution

R = 336
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera")
LARGE_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field")
HIGH_PINPOINTS = [[2016, 2016], [1008, 4032], [4032, 1008]]  # (height, width), LLaVA-NeXT's order


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def with_long_side(img: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def image_groups() -> dict[str, list[bytes]]:
    photos = {name: Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS}
    small = [jpeg(img) for img in photos.values()] + [
        jpeg(with_long_side(img, 200)) for img in photos.values()
    ]
    large = [jpeg(with_long_side(photos[name], side)) for name in LARGE_PHOTOS for side in (2000, 4000)]
    return {"<=1000 px": small, "1000-4000 px": large}


# ---------------------------------------------------------------------------------------------
# Pipelines: each takes JPEG bytes and returns what would cross the wire.


def engine(config: ZoomConfig) -> Callable[[bytes], np.ndarray]:
    return lambda data: make_crops(data, config).pixels


def released(clip: CLIPImageProcessor) -> Callable[[bytes], torch.Tensor]:
    """The released code's steps: RGB decode, medium grid by select_best_resolution, high = 3x
    medium, ``Image.resize`` (bicubic) per level, crops cut with ``Image.crop``, then one
    CLIPImageProcessor call per crop and a stack of float32 tensors."""
    medium_sizes = [(2 * R, 2 * R), (R, 4 * R), (4 * R, R)]

    def run(data: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        medium = select_best_resolution(image.size, medium_sizes)
        high = (3 * medium[0], 3 * medium[1])
        crops = [image.resize((R, R))]
        for size in (medium, high):
            resized = image.resize(size)
            crops += [
                resized.crop((x, y, x + R, y + R)) for y in range(0, size[1], R) for x in range(0, size[0], R)
            ]
        return torch.stack([clip.preprocess(c, return_tensors="pt")["pixel_values"][0] for c in crops])

    return run


def llava_next(processor: LlavaNextImageProcessor) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        return processor(image, return_tensors="np")["pixel_values"]

    return run


def floor(config: ZoomConfig) -> Callable[[bytes], bytes]:
    resizer = RESIZERS["torch"]

    def run(data: bytes) -> bytes:
        image = open_image(data, config, source="floor")
        columns, rows = high_grid_of(choose_grid(image.size, config), config)
        return resizer.hwc(resizer.resize(resizer.prepare(image), (columns * R, rows * R))).tobytes()

    return run


def output_bytes(output) -> int:
    if isinstance(output, bytes):
        return len(output)
    return output.element_size() * output.nelement() if isinstance(output, torch.Tensor) else output.nbytes


# ---------------------------------------------------------------------------------------------


def measure(pipelines: dict[str, Callable], images: list[bytes], repeats: int) -> dict[str, dict]:
    for run in pipelines.values():  # warm-up: first-call costs stay out of the numbers
        run(images[0])
    cpu = {name: [] for name in pipelines}
    wall = {name: [] for name in pipelines}
    for _ in range(repeats):
        for name, run in pipelines.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for data in images:
                run(data)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    results = {}
    for name, run in pipelines.items():
        n = len(images)
        results[name] = {
            "images_per_s_cpu": n / statistics.median(cpu[name]),
            "images_per_s_wall": n / statistics.median(wall[name]),
            "ms_per_image_cpu": 1000 * statistics.median(cpu[name]) / n,
            "bytes_per_sample": output_bytes(run(images[0])),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/preprocess.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    fast, exact = ZoomConfig(backend="torch"), ZoomConfig(backend="pil")
    clip = CLIPImageProcessor(size={"shortest_edge": R}, crop_size={"height": R, "width": R})
    llava = LlavaNextImageProcessor(
        image_grid_pinpoints=HIGH_PINPOINTS, size={"shortest_edge": R}, crop_size={"height": R, "width": R}
    )
    pipelines = {
        "engine (torch)": engine(fast),
        "engine (pil)": engine(exact),
        "released": released(clip),
        "llava_next": llava_next(llava),
        "floor": floor(fast),
    }

    report = {
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "transformers": transformers.__version__,
        },
        "resolution": R,
        "repeats": args.repeats,
        "groups": {},
    }
    for group, images in image_groups().items():
        sizes = [Image.open(io.BytesIO(d)).size for d in images]
        results = measure(pipelines, images, args.repeats)
        ours = results["engine (torch)"]["images_per_s_cpu"]
        for name in ("released", "llava_next", "floor"):
            results["engine (torch)"][f"speedup_vs_{name}"] = ours / results[name]["images_per_s_cpu"]
        report["groups"][group] = {
            "n_images": len(images),
            "sizes": sizes,
            "results": results,
        }
        _print_group(group, sizes, results)
    report["machine"]["load_average_at_end"] = os.getloadavg()

    small = report["groups"]["<=1000 px"]["results"]["engine (torch)"]
    report["targets_met"] = {
        "75_images_per_s": small["images_per_s_cpu"] >= 75,
        "7x_llava_next": small["speedup_vs_llava_next"] >= 7,
        "5x_released": small["speedup_vs_released"] >= 5,
    }
    print("targets (<=1000 px, default backend):", report["targets_met"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print_group(group: str, sizes: list[tuple[int, int]], results: dict[str, dict]) -> None:
    longest = [max(s) for s in sizes]
    print(f"\n{group}: {len(sizes)} JPEGs, long side {min(longest)}-{max(longest)} px, one core")
    header = (
        f"{'pipeline':<16}{'img/s cpu':>11}{'img/s wall':>12}{'ms/img':>9}{'MB/sample':>11}{'engine x':>10}"
    )
    print(header)
    print("-" * len(header))
    ours = results["engine (torch)"]["images_per_s_cpu"]
    for name, r in results.items():
        print(
            f"{name:<16}{r['images_per_s_cpu']:>11.1f}{r['images_per_s_wall']:>12.1f}{r['ms_per_image_cpu']:>9.1f}"
            f"{r['bytes_per_sample'] / 1e6:>11.1f}{ours / r['images_per_s_cpu']:>10.2f}"
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
