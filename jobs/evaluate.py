"""Evaluate a Dragonfly model on a LLaVA manifest: batched greedy generation with Ray Data.

    python jobs/evaluate.py --model models:/Dragonfly@champion --data data/demo/val.jsonl --task open
    python jobs/evaluate.py --model runs/tiny-stage1/export --data s3://bucket/val.jsonl --num-gpus 1
    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/evaluate.py --model runs:/<run id>/model --data ...

``--model``: a local export folder, an ``s3://`` prefix, ``runs:/<id>/<path>``, ``models:/<name>@<alias>``,
``models:/<name>/<version>``. Predictions and per-sample scores become a table (Parquet + CSV) and
the metrics ``eval/<set>/<metric>`` are logged to MLflow on the evaluated model's run (or a new
evaluation run when the model has none, or with ``--new-run``). Exit status: 0 done, 1 too many
samples failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from dragonfly_platform.cli import connect_ray
from dragonfly_platform.evaluate import EvalConfig, EvaluationError, evaluate_model
from dragonfly_platform.manifest import ManifestFormatError

# Optional flags -> EvalConfig fields (unset flags keep the config's defaults).
CONFIG_FLAGS = {
    "task": str,
    "image_root": str,
    "name": str,
    "limit": int,
    "max_new_tokens": int,
    "batch_size": int,
    "replicas": int,
    "num_gpus": float,
    "num_cpus": float,
    "max_error_fraction": float,
    "download_dir": str,
    "experiment": str,
}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model URI (folder, s3://, runs:/, models:/)")
    parser.add_argument(
        "--data", required=True, help="evaluation manifest (JSON/JSONL/Parquet, local or s3://)"
    )
    for field, kind in CONFIG_FLAGS.items():
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind, help=f"EvalConfig.{field}")
    parser.add_argument("--out", help="also write the table here (local folder or s3:// prefix)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    destination = parser.add_mutually_exclusive_group()
    destination.add_argument("--new-run", action="store_true", help="log on a new evaluation run")
    destination.add_argument("--no-log", action="store_true", help="log nothing to MLflow")
    parser.add_argument("--num-ray-cpus", type=float, help="logical CPUs of a local Ray started here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {field: getattr(args, field) for field in CONFIG_FLAGS if getattr(args, field) is not None}
    try:
        cfg = EvalConfig(data=args.data, **settings)
    except ValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    connect_ray(args.num_ray_cpus)
    log_to = "new" if args.new_run else "none" if args.no_log else "auto"
    try:
        result = evaluate_model(
            args.model, cfg, tracking_uri=args.tracking_uri, log_to=log_to, out_dir=args.out
        )
    except (ManifestFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"model": result.model.pinned_uri, "run_id": result.run_id, "metrics": result.metrics}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
