"""The Quickstart end to end on one machine, no servers, no downloads (``make quickstart``).

1. writes the demo dataset (``data/demo``) if it is not there;
2. starts a local Ray;
3. trains the tiny model's stage 1 (projector only), then stage 2 (everything) from stage 1's export,
   each with 2 Ray Train workers running DeepSpeed ZeRO-2 on CPU (gloo);
4. exports each stage (safetensors + processor) and logs everything to a local MLflow store;
5. prints where the results are and how to open them.

Rerunning continues finished or interrupted stages from their checkpoints; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tiny_stage1", "tiny_stage2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", help="storage folder of both runs and MLflow (default: runs/quickstart in the repo)"
    )
    parser.add_argument("--data", help="demo dataset folder (default: data/demo in the repo)")
    parser.add_argument("--num-cpus", type=float, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--fresh", action="store_true", help="delete --out first")
    args = parser.parse_args(argv)
    # Paths given on the command line are the caller's, resolved before moving to the repo.
    out = Path(args.out).resolve() if args.out else ROOT / "runs" / "quickstart"
    data = Path(args.data).resolve() if args.data else ROOT / "data" / "demo"
    os.chdir(ROOT)
    started = time.perf_counter()

    from dragonfly_platform.config import load_run_config

    if args.fresh and out.exists():
        shutil.rmtree(out)
    configs = []
    for stage in STAGES:
        overrides = [
            f"run.storage_path={out}",
            f"data.train_manifest={data / 'train.jsonl'}",
            f"data.val_manifest={data / 'val.jsonl'}",
        ]
        if stage == "tiny_stage2":
            overrides.append(f"train.init_from={out / 'tiny-stage1' / 'export'}")
        configs.append(load_run_config(ROOT / "jobs" / "configs" / f"{stage}.yaml", overrides))

    _step(1, "demo data")
    if (data / "train.jsonl").exists():
        print(f"    {data} already there")
    else:
        from dragonfly_platform.demo_data import write_demo_dataset

        summary = write_demo_dataset(data)
        print(f"    wrote {summary['n_train']} train / {summary['n_val']} val records to {data}")

    _step(2, "local Ray")
    from dragonfly_platform.cli import start_local_ray

    # Logical CPUs above the core count: the train workers take 0.5 each and Ray Data's map tasks
    # need slots of their own, or they starve (stack-facts: the 2-CPU deadlock).
    start_local_ray(args.num_cpus)
    import ray

    from dragonfly_platform.train import run_training

    results = []
    for number, cfg in enumerate(configs, start=3):
        _step(
            number,
            f"train {cfg.run.name}: freeze plan {cfg.train.freeze!r}, {cfg.run.num_workers} workers, ZeRO-{cfg.train.zero_stage}",
        )
        stage_started = time.perf_counter()
        result = run_training(cfg)
        results.append((cfg, result, time.perf_counter() - stage_started))
    ray.shutdown()

    _step(5, "results")
    for cfg, result, seconds in results:
        metrics = result.metrics or {}
        print(
            f"    {cfg.run.name}: {metrics.get('step')} steps, {metrics.get('samples')} samples, "
            f"val_loss {metrics.get('val_loss', float('nan')):.3f}, {seconds:.0f} s"
        )
        print(f"      export      {cfg.export_dir()}")
        print(f"      checkpoints {cfg.run_dir()}/checkpoint_step_*")
    tracking = configs[0].tracking_uri()
    print(f"    MLflow store  {tracking} (experiment {configs[0].mlflow.experiment!r})")
    print("\n  Open the runs:")
    print(
        f"    .venv/bin/mlflow ui --backend-store-uri {tracking} --port 5000   # then http://127.0.0.1:5000"
    )
    print(f"\n  Done in {(time.perf_counter() - started) / 60:.1f} min.")
    return 0


def _step(number: int, title: str) -> None:
    print(f"\n[{number}/5] {title}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
