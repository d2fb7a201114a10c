"""A Ray Tune sweep end to end on the session's Ray cluster, MLflow server and S3 server, on the demo
data: interrupted (Ctrl-C) after its first trial it publishes nothing; rerun, it continues, ASHA stops
a planted bad trial, and it ends with one MLflow parent, one child per trial, the results table and
the plot. One sweep serves all of it: each trial costs a Ray Train run. A trial failing with an error
no retry can fix runs once and ends with its reason in the results."""

from __future__ import annotations

import csv
import io
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
    sweep_storage_dir,
)
from dragonfly_platform.tune import EXACT_MATCH, ROLE_TAG, SWEEP_DIR_TAG

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


def assert_sweep_logged(client: MlflowClient, sweep, experiment: str, rows: list[dict], results: dict):
    """One MLflow parent and one child per trial, each child with its trial's params, image tokens,
    TFLOPs, metrics and ending; the results table, JSON and plot (``results``: their bytes) agree
    with the trials, in the sweep folder and on the parent run."""
    parents, children = sweep_runs(client, experiment)
    assert len(parents) == 1 and len(children) == len(rows)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.status"] == "finished"
    assert parent.data.tags[SWEEP_DIR_TAG] == sweep_storage_dir(sweep, load_base(sweep))
    assert parent.data.params["sweep.algorithm"] == "grid"

    base = load_base(sweep)
    by_run = {r["mlflow_run_id"]: r for r in rows}
    assert set(by_run) == {c.info.run_id for c in children}
    for child in children:
        row = by_run[child.info.run_id]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == ("FINISHED" if row["status"] == "complete" else "KILLED"), row
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
        # Metrics agree between Tune's results and the child run; exact match only once trained.
        assert child.data.metrics["val_loss"] == pytest.approx(row["val_loss"])
        if row["status"] == "complete":
            assert child.data.metrics[EXACT_MATCH] == pytest.approx(row[EXACT_MATCH])
            assert 0.0 <= row[EXACT_MATCH] <= 1.0
        else:
            assert row[EXACT_MATCH] is None and EXACT_MATCH not in child.data.metrics

    # The results table and the plot, in the sweep folder and on the parent run, agree with the trials.
    table = {r["mlflow_run_id"]: r for r in csv.DictReader(io.StringIO(results["results.csv"].decode()))}
    assert set(table) == set(by_run)
    for run_id, row in table.items():
        assert float(row["val_loss"]) == pytest.approx(by_run[run_id]["val_loss"])
        assert int(row[IMAGE_TOKENS]) == by_run[run_id][IMAGE_TOKENS]
        if by_run[run_id][EXACT_MATCH] is not None:
            assert float(row[EXACT_MATCH]) == pytest.approx(by_run[run_id][EXACT_MATCH])
    assert any(r["pareto_tokens"] == "True" for r in table.values())
    assert results["pareto.png"][:8] == b"\x89PNG\r\n\x1a\n"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert artifacts == {"results/results.csv", "results/results.json", "results/pareto.png"}
    saved = json.loads(results["results.json"])
    assert {t["mlflow_run_id"]: t["val_loss"] for t in saved["trials"]} == {
        k: r["val_loss"] for k, r in by_run.items()
    }


def _first_trial_terminated(fs, sweep_dir: str) -> bool:
    """Tune's saved experiment state (what a restore reads) shows a trial TERMINATED."""
    try:
        states = [p for p in fs.ls(sweep_dir, refresh=True) if "/experiment_state-" in p]
    except FileNotFoundError:
        return False
    for state in states:
        try:
            trials = json.loads(fs.cat(state))["trial_data"]
        except (OSError, ValueError):
            continue  # being rewritten
        if any(json.loads(trial)["status"] == "TERMINATED" for trial, _ in trials):
            return True
    return False


def test_a_sweep_on_s3_interrupted_publishes_nothing_then_resumes_stops_a_bad_trial_and_logs_it_all(
    ray_cluster, mlflow_server, s3_server, demo_data, tmp_path
):
    """Three trials, one at a time: zoom levels L+M with 4 medium tokens, then L+H at a good and at
    a planted bad learning rate (1e-9 leaves the validation loss where it started). Ctrl-C once the
    first has finished; the rerun runs the other two, and ASHA stops the bad one at its first rung,
    against the good one. On S3 as on a cluster, with the endpoint and keys in the sweep's config
    only (the driver's environment has none): Tune's state, the trials' Train runs and the results
    all go through them."""
    import s3fs

    options = s3_server.storage_options()
    prefix = f"test-bucket/sweeps-{tmp_path.name}"
    path = write_sweep(
        tmp_path,
        demo_data,
        mlflow_server.tracking_uri,
        overrides={
            "train.max_steps": 6,
            "data.storage.endpoint_url": s3_server.endpoint_url,
            "data.storage.access_key": options["key"],
            "data.storage.secret_key": options["secret"],
        },
        search=[
            {"model.zoom.levels": {"grid": [["low", "medium"]]}, "model.tokens.tokens.medium": {"grid": [4]}},
            {"model.zoom.levels": {"grid": [["low", "high"]]}, "train.lr": {"grid": [2.0e-3, 1.0e-9]}},
        ],
        scheduler={"type": "asha", "grace_period": 1, "max_t": 3, "reduction_factor": 2},
        exact_match_samples=4,
        report_metric=EXACT_MATCH,
        report_mode="max",
        max_concurrent_trials=1,
        storage_path=f"s3://{prefix}",
    )
    sweep = load_sweep_config(path)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    sweep_dir = f"{prefix}/sweeps/tiny"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "RAY_ADDRESS": ray_cluster.address_info["address"],
        # Save Tune's state every 2 s (not at its adaptive pace), so the kill soon follows the first trial.
        "TUNE_GLOBAL_CHECKPOINT_S": "2",
    }
    command = [sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(path)]
    driver = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        # A guard against hanging forever, not a speed check: loaded CI machines are slow.
        deadline = time.monotonic() + 1200
        while not _first_trial_terminated(fs, sweep_dir):
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
    experiment = f"sweep-{tmp_path.name}"
    parents, children = sweep_runs(client, experiment)
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

    stored = [p.removeprefix(f"{sweep_dir}/") for p in fs.find(sweep_dir)]
    assert any(p.startswith("experiment_state-") for p in stored), stored[:20]  # Tune's state
    assert any(p.startswith("trials/") and "/checkpoint_step_" in p for p in stored)
    results = {
        name: fs.cat(f"{sweep_dir}/results/{name}") for name in ("results.csv", "results.json", "pareto.png")
    }
    rows = json.loads(results["results.json"])["trials"]
    parents, children = sweep_runs(client, experiment)
    assert len(parents) == 1 and len(children) == 3  # the same parent, one run per trial
    # The first trial ran once: its validation history has one entry per report (steps 2, 4, 6).
    history = client.get_metric_history(finished_first[0], "val_loss")
    assert sorted(m.step for m in history) == [2, 4, 6]

    by_point = {(r["model.zoom.levels"][1], r.get("train.lr")): r for r in rows}  # all start at low
    first, good, bad = by_point[("medium", None)], by_point[("high", 2.0e-3)], by_point[("high", 1.0e-9)]
    assert first["mlflow_run_id"] == finished_first[0]
    assert first["status"] == good["status"] == "complete" and first["reports"] == good["reports"] == 3
    assert bad["status"] == "stopped_early" and bad["reports"] == 1, bad
    assert bad["val_loss"] > good["val_loss"]
    assert client.get_run(bad["mlflow_run_id"]).data.tags["sweep.status"] == "stopped_early"
    # L+M with 4 medium tokens, L+H with the tiny default 1: 16 + 4*4, 16 + 36*1.
    assert (first[IMAGE_TOKENS], good[IMAGE_TOKENS], bad[IMAGE_TOKENS]) == (32, 52, 52)
    assert_sweep_logged(client, sweep, experiment, rows, results)


def test_a_trial_no_retry_can_fix_fails_once_with_its_reason(ray_cluster, mlflow_server, demo_data, tmp_path):
    """A global batch of 32 cannot be filled by one worker's 16 rows: only the workers, which read
    the data, can tell, and they would tell every attempt. With max_failures 2 the trial runs once
    and ends with its reason in the results, its MLflow run FAILED, the sweep finished."""
    from ray import tune

    from dragonfly_platform.tune import run_sweep

    path = write_sweep(
        tmp_path,
        demo_data,
        mlflow_server.tracking_uri,
        overrides={"train.global_batch_size": 32},
        search={"model.zoom.levels": {"grid": [["low", "medium"]]}},
        max_failures=2,
    )
    sweep = load_sweep_config(path)
    rows, paths = run_sweep(sweep)
    (row,) = rows
    assert row["status"] == "error" and row["val_loss"] is None, row
    assert row["error"].startswith("ConfigError: ") and "cannot fill one optimizer step" in row["error"]
    (saved,) = json.loads(paths["json"].read_text())["trials"]
    with open(paths["csv"]) as f:
        (table,) = csv.DictReader(f)
    assert saved["error"] == table["error"] == row["error"] and saved["status"] == table["status"] == "error"
    (trial,) = tune.ExperimentAnalysis(sweep_storage_dir(sweep, load_base(sweep))).trials
    assert trial.status == trial.TERMINATED and trial.num_failures == 0  # one attempt, no retry
    client = MlflowClient(mlflow_server.tracking_uri)
    (parent,), (child,) = sweep_runs(client, f"sweep-{tmp_path.name}")
    assert child.info.run_id == row["mlflow_run_id"] and child.info.status == "FAILED"
    assert child.data.tags["sweep.status"] == "error"
    assert parent.info.status == "FINISHED"
