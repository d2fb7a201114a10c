"""Curate training data: dedup, per-image caps, source weights, text-only mix -> Parquet shards.

    python jobs/prepare_data.py --config jobs/configs/prepare_data_demo.yaml [--output s3://bucket/curated]
    ray job submit --runtime-env infra/runtime_env.yaml -- python jobs/prepare_data.py --config ...

Runs on the Ray cluster in RAY_ADDRESS (or a local one). Prints the per-source counts before and
after each step; the output folder also gets _curation_report.json and _bad_records.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys

from dragonfly_platform.cli import connect_ray
from dragonfly_platform.config import ConfigError, read_yaml_mapping, validate_config
from dragonfly_platform.curation import CurationConfig, format_counts, run_curation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML recipe (see jobs/configs/prepare_data_demo.yaml)"
    )
    parser.add_argument("--output", help="override the recipe's output folder / s3:// prefix")
    parser.add_argument("--seed", type=int, help="override the recipe's seed")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    try:
        recipe = read_yaml_mapping(args.config, "curation recipe")
        if args.output:
            recipe["output"] = args.output
        if args.seed is not None:
            recipe["seed"] = args.seed
        config = validate_config(CurationConfig, recipe, args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    connect_ray()
    report = run_curation(config)
    print(json.dumps(report, indent=2) if args.json else format_counts(report))
    print(f"wrote {report['n_output']} records to {report['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
