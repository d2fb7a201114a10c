"""The job entrypoints turn bad input into one ``error:`` line and exit code 2, before any work (no
Ray, no MLflow run, no download), as a user running them by hand or through ``ray job submit`` sees.
Each job's ``main`` runs in this process (the same code path as ``python jobs/<name>.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_job(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(name: str, *args: str) -> tuple[int, str]:
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        code = job.main(list(args))
        return code, capsys.readouterr().err

    return run


def test_train_job_refuses_an_s3_run_without_an_mlflow_server(run_job):
    code, err = run_job(
        "train",
        "--config",
        str(ROOT / "jobs/configs/tiny_stage1.yaml"),
        "--set",
        "run.storage_path=s3://bucket/runs",
    )
    assert code == 2, err
    assert "error: run.storage_path is on S3: set mlflow.tracking_uri" in err


def test_promote_job_names_a_bad_eval_section(run_job, tmp_path):
    config = yaml.safe_load((ROOT / "jobs/configs/promote.yaml").read_text())
    config["eval"]["batch_sise"] = 8
    path = tmp_path / "promote.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_job(
        "promote", "--run", "0" * 32, "--config", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"
    )
    assert code == 2, err
    assert f"error: {path} (eval section): 1 problem(s):\n  - batch_sise: unknown key" in err


def test_prepare_data_job_refuses_an_empty_or_wrong_recipe(run_job, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    code, err = run_job("prepare_data", "--config", str(empty))
    assert code == 2 and err.startswith(f"error: {empty}: "), err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("outptu: somewhere\n")
    code, err = run_job("prepare_data", "--config", str(wrong))
    assert code == 2 and "outptu: unknown key" in err, err
