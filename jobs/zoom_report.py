"""The paper's Figure 4 for any manifest: distribution of the zoom ratio (high-res / native).

    python jobs/zoom_report.py --manifest data/demo/train.jsonl --out runs/zoom_report
    python jobs/zoom_report.py --manifest s3://bucket/llava.json --image-root s3://bucket/images --out ...

Writes zoom_ratios.csv, zoom_ratio_cdf.png and zoom_report.json; prints the shares zoomed >= 2x and
>= 4x. S3 endpoint and credentials come from the usual AWS environment variables.
"""

from __future__ import annotations

import argparse
import json
import sys

from dragonfly.config import ZoomConfig
from dragonfly_platform.cli import connect_ray
from dragonfly_platform.zoom_report import run_zoom_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", required=True, help="LLaVA JSON/JSONL/Parquet, local or s3://")
    parser.add_argument("--image-root", help="folder or s3:// prefix of the images (default: the manifest's)")
    parser.add_argument("--out", required=True, help="local output folder")
    parser.add_argument("--resolution", type=int, default=336, help="R, the crop size")
    parser.add_argument("--grid-rule", choices=["released", "aspect"], default="released")
    parser.add_argument("--threads", type=int, default=16, help="concurrent header reads per task")
    args = parser.parse_args(argv)

    connect_ray()
    zoom = ZoomConfig(resolution=args.resolution, grid_rule=args.grid_rule)
    summary = run_zoom_report(
        args.manifest, args.out, zoom=zoom, image_root=args.image_root, threads=args.threads
    )
    print(json.dumps(summary, indent=2))
    print(
        f"{summary['share_at_least_2x']:.1%} of {summary['images']} images are zoomed in at least 2x, "
        f"{summary['share_at_least_4x']:.1%} at least 4x (paper, Figure 4: 95% and 65%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
