"""Ray Tune sweeps end to end on the session's Ray cluster and MLflow server, on the demo data: a tiny
sweep interrupted (Ctrl-C) after its first trial publishes nothing, continues when rerun and ends
with one MLflow parent, one child per trial, the results table and the plot; ASHA stops a planted
bad trial of a sweep on S3."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from dragonfly.budget import config_report
from dragonfly_platform.demo_data import write_demo_dataset
from dragonfly_platform.sweep_config import (
    IMAGE_TOKENS,
    TFLOPS,
    load_base,
    load_sweep_config,
    resolve_trial_config,
)
from dragonfly_platform.tune import EXACT_MATCH, ROLE_TAG, SWEEP_DIR_TAG, run_sweep

REPO = Path(__file__).resolve().parents[2]
TINY_BASE = str(REPO / "jobs" / "configs" / "tiny_stage1.yaml")


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_dataset(out, 16, 8, 0)
    return out


def write_sweep(tmp_path: Path, demo: Path, tracking_uri: str, **fields) -> Path:
    """A tiny sweep over tiny_stage1: one 0.49-CPU worker per trial, 2 optimizer steps per report."""
    overrides = {
        "data.train_manifest": str(demo / "train.jsonl"),
        "data.val_manifest": str(demo / "val.jsonl"),
        "run.num_workers": 1,
        "run.cpus_per_worker": 0.49,
        "train.global_batch_size": 2,
        "train.micro_batch_size": 2,
        "train.epochs": 1,
        "train.max_steps": 4,
        "train.checkpoint_every": 2,
        "train.eval_batches": 2,
        # One worker has nothing to partition: ZeRO-0 skips DeepSpeed's flat parameter buffers.
        "train.zero_stage": 0,
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.experiment": f"sweep-{tmp_path.name}",
        **fields.pop("overrides", {}),
    }
    raw = {
        "name": "tiny",
        "base": TINY_BASE,
        "storage_path": str(tmp_path / "runs"),
        "overrides": overrides,
        "metric": "val_loss",
        "mode": "min",
        "exact_match_samples": 0,
        **fields,
    }
    path = tmp_path / "sweep_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def sweep_runs(client: MlflowClient, experiment: str):
    """(parent runs, child runs) of the sweep's experiment."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(parents) + len(children) == len(runs), "only sweep and trial runs are expected"
    return parents, children


def assert_sweep_logged(client: MlflowClient, sweep, experiment: str, rows: list[dict], results: Path):
    """One MLflow parent and one child per trial, each child with its trial's params, image tokens,
    TFLOPs and metrics; the results table, JSON and plot agree with the trials, locally and on the
    parent run."""
    assert len(rows) == 2 and all(r["status"] == "complete" for r in rows), rows
    assert all(r["reports"] == 2 for r in rows)  # steps 2 and 4, each with a validation loss

    parents, children = sweep_runs(client, experiment)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.status"] == "finished"
    assert parent.data.tags[SWEEP_DIR_TAG] == str(results.parent)
    assert parent.data.params["sweep.algorithm"] == "grid"

    base = load_base(sweep)
    by_run = {r["mlflow_run_id"]: r for r in rows}
    assert set(by_run) == {c.info.run_id for c in children}
    for child in children:
        row = by_run[child.info.run_id]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        params = child.data.params
        levels = yaml.safe_load(params["sweep.model.zoom.levels"])
        assert levels == row["model.zoom.levels"]
        if "model.tokens.tokens.medium" in row:
            assert int(params["sweep.model.tokens.tokens.medium"]) == row["model.tokens.tokens.medium"]
        # The training run's own params show the trial's resolved model.
        assert yaml.safe_load(params["model.zoom.levels"].replace("'", '"')) == levels
        # Image tokens and TFLOPs from the calculator, for this trial's config.
        model = resolve_trial_config(
            base, sweep, {k: row[k] for k in row if k.startswith("model.")}
        ).dragonfly_config()
        report = config_report(model.zoom, model.tokens)
        assert int(params[IMAGE_TOKENS]) == report["image_tokens"] == row[IMAGE_TOKENS]
        assert child.data.metrics[TFLOPS] == pytest.approx(report["total_flops"] / 1e12)
        # Metrics agree between Tune's results and the child run.
        assert child.data.metrics["val_loss"] == pytest.approx(row["val_loss"])
        assert child.data.metrics[EXACT_MATCH] == pytest.approx(row[EXACT_MATCH])
        assert 0.0 <= row[EXACT_MATCH] <= 1.0
    # L+M with 4 medium tokens, L+H with the tiny default 1: 16 + 4*4, 16 + 36*1.
    assert sorted(r[IMAGE_TOKENS] for r in rows) == [32, 52]

    # The results table and the plot, locally and on the parent run, agree with the trials.
    with open(results / "results.csv") as f:
        table = {r["mlflow_run_id"]: r for r in csv.DictReader(f)}
    assert set(table) == set(by_run)
    for run_id, row in table.items():
        assert float(row["val_loss"]) == pytest.approx(by_run[run_id]["val_loss"])
        assert float(row[EXACT_MATCH]) == pytest.approx(by_run[run_id][EXACT_MATCH])
        assert int(row[IMAGE_TOKENS]) == by_run[run_id][IMAGE_TOKENS]
    assert any(r["pareto_tokens"] == "True" for r in table.values())
    assert (results / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert artifacts == {"results/results.csv", "results/results.json", "results/pareto.png"}
    saved = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "results/results.json", str(results.parent))
        ).read_text()
    )
    assert {t["mlflow_run_id"]: t["val_loss"] for t in saved["trials"]} == {
        k: r["val_loss"] for k, r in by_run.items()
    }


def test_asha_stops_a_planted_bad_trial_of_a_sweep_on_s3(
    ray_cluster, mlflow_server, s3_server, demo_data, tmp_path
):
    """On S3 as on a cluster, with the endpoint and keys in the sweep's config only (this driver's
    environment has none): Tune's state, the trials' Train runs and the results go through them."""
    import s3fs

    assert not {"AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"} & set(os.environ)
    options = s3_server.storage_options()
    storage = {
        "data.storage.endpoint_url": s3_server.endpoint_url,
        "data.storage.access_key": options["key"],
        "data.storage.secret_key": options["secret"],
    }
    prefix = f"test-bucket/sweeps-{tmp_path.name}"
    # The good trial runs first (one trial at a time), so the bad one meets its record at rung 1.
    # A learning rate of 1e-9 leaves the validation loss where it started.
    path = write_sweep(
        tmp_path,
        demo_data,
        mlflow_server.tracking_uri,
        overrides={"train.max_steps": 6, **storage},
        search={"train.lr": {"grid": [2.0e-3, 1.0e-9]}},
        scheduler={"type": "asha", "grace_period": 1, "max_t": 3, "reduction_factor": 2},
        max_concurrent_trials=1,
        storage_path=f"s3://{prefix}",
    )
    rows, _ = run_sweep(load_sweep_config(path))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    stored = [p.removeprefix(f"{prefix}/sweeps/tiny/") for p in fs.find(f"{prefix}/sweeps/tiny")]
    assert any(p.startswith("experiment_state-") for p in stored), stored[:20]  # Tune's state
    assert {"results/results.csv", "results/results.json", "results/pareto.png"} <= set(stored)
    assert any(p.startswith("trials/") and "/checkpoint_step_" in p for p in stored)
    by_lr = {r["train.lr"]: r for r in rows}
    good, bad = by_lr[2.0e-3], by_lr[1.0e-9]
    assert good["status"] == "complete" and good["reports"] == 3
    assert bad["status"] == "stopped_early" and bad["reports"] == 1, bad
    assert bad["val_loss"] > good["val_loss"]
    client = MlflowClient(mlflow_server.tracking_uri)
    stopped = client.get_run(bad["mlflow_run_id"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["sweep.status"] == "stopped_early"


def _first_trial_terminated(sweep_dir: Path) -> bool:
    """Tune's saved experiment state (what a restore reads) shows a trial TERMINATED."""
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError):
            continue  # being rewritten
        if any(json.loads(trial)["status"] == "TERMINATED" for trial, _ in trials):
            return True
    return False


def test_an_interrupted_sweep_publishes_nothing_then_resumes_and_logs_one_parent_children_table_and_plot(
    ray_cluster, mlflow_server, demo_data, tmp_path
):
    path = write_sweep(
        tmp_path,
        demo_data,
        mlflow_server.tracking_uri,
        search=[
            {"model.zoom.levels": {"grid": [["low", "medium"]]}, "model.tokens.tokens.medium": {"grid": [4]}},
            {"model.zoom.levels": {"grid": [["low", "high"]]}},
        ],
        exact_match_samples=4,
        report_metric=EXACT_MATCH,
        report_mode="max",
        max_concurrent_trials=1,
    )
    sweep_dir = tmp_path / "runs" / "sweeps" / "tiny"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.address_info["address"],
        # Save Tune's state on every loop, so the kill lands after the first trial was recorded.
        "TUNE_GLOBAL_CHECKPOINT_S": "0",
    }
    command = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(path)]
    driver = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        # A guard against hanging forever, not a speed check: loaded CI machines are slow.
        deadline = time.monotonic() + 1200
        while not _first_trial_terminated(sweep_dir):
            assert driver.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "no trial finished within 20 minutes"
            time.sleep(0.5)
        time.sleep(1.0)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops the trials and saves its state
        assert driver.wait(timeout=300) == 130
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    client = MlflowClient(mlflow_server.tracking_uri)
    parents, children = sweep_runs(client, f"sweep-{tmp_path.name}")
    finished_first = [c.info.run_id for c in children if c.info.status == "FINISHED"]
    assert len(finished_first) == 1
    # Nothing is published for an interrupted sweep: no trial marked stopped early, no results.
    (parent,) = parents
    assert parent.data.tags["sweep.status"] == "interrupted" and parent.info.status != "FINISHED"
    assert not client.list_artifacts(parent.info.run_id, "results")
    assert not any("sweep.status" in c.data.tags for c in children)

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout

    parents, children = sweep_runs(client, f"sweep-{tmp_path.name}")
    assert len(parents) == 1 and len(children) == 2  # the same parent, no third trial run
    assert all(c.info.status == "FINISHED" for c in children)
    # The first trial ran once: its validation history has one entry per report (steps 2 and 4).
    history = client.get_metric_history(finished_first[0], "val_loss")
    assert sorted(m.step for m in history) == [2, 4]
    rows = json.loads((sweep_dir / "results" / "results.json").read_text())["trials"]
    assert_sweep_logged(
        client, load_sweep_config(path), f"sweep-{tmp_path.name}", rows, sweep_dir / "results"
    )
