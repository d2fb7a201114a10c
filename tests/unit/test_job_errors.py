"""The job entrypoints turn bad input into one ``error:`` line and exit code 2, before any work (no
Ray, no MLflow run, no download), as a user running them by hand or through ``ray job submit`` sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def run_job(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_train_job_refuses_an_s3_run_without_an_mlflow_server():
    done = run_job(
        "jobs/train.py",
        "--config",
        "jobs/configs/tiny_stage1.yaml",
        "--set",
        "run.storage_path=s3://bucket/runs",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: run.storage_path is on S3: set mlflow.tracking_uri" in done.stderr


def test_promote_job_names_a_bad_eval_section(tmp_path):
    config = yaml.safe_load((ROOT / "jobs/configs/promote.yaml").read_text())
    config["eval"]["batch_sise"] = 8
    path = tmp_path / "promote.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_job(
        "jobs/promote.py",
        "--run",
        "0" * 32,
        "--config",
        str(path),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {path} (eval section): 1 problem(s):\n  - batch_sise: unknown key" in done.stderr


def test_prepare_data_job_refuses_an_empty_or_wrong_recipe(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    done = run_job("jobs/prepare_data.py", "--config", str(empty))
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"error: {empty}: " in done.stderr and "Traceback" not in done.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("outptu: somewhere\n")
    done = run_job("jobs/prepare_data.py", "--config", str(wrong))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "outptu: unknown key" in done.stderr
