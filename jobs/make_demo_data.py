"""Write the demo dataset (LLaVA JSONL + images) used by the quickstart and the tests.

python jobs/make_demo_data.py --out data/demo [--n-train 64 --n-val 16 --seed 0 --with-bad-records]
"""

from __future__ import annotations

import argparse
import json
import sys

from dragonfly_platform.demo_data import write_demo_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/demo", help="output folder")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--with-bad-records",
        action="store_true",
        help="add records the pipeline must skip (missing file, truncated JPEG, not an image, "
        "unknown role, empty answer, no conversations)",
    )
    args = parser.parse_args(argv)
    summary = write_demo_dataset(args.out, args.n_train, args.n_val, args.seed, args.with_bad_records)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
