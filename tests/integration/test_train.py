"""Ray Train + DeepSpeed on 2 CPU workers: loss falls, checkpoints hold the weights, ZeRO stages agree
(ZeRO-3 through an S3 outage and its rerun), and no credential reaches logs, params or artifacts."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ray.train import UserCallback
from safetensors.torch import load_file

from dragonfly.model import DragonflyModel
from dragonfly_platform.config import parse_run_config
from dragonfly_platform.data import TooManyBadRecords
from dragonfly_platform.services import wait_until
from dragonfly_platform.train import DEEPSPEED_TAG, run_training

# The conftest's tiny run: 2 workers x global batch 8, 2 epochs of 32 rows = 8 steps, 64 samples.
STEPS, SAMPLES = 8, 64
PLANTED_PASSWORD = "planted-mlflow-password-7f3a9c"


def mlflow_run(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri())
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id], f"tags.`dragonfly.run_name` = '{cfg.run.name}'")
    return client, runs


def losses(client, run_id):
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in history}


def local_export(export_dir: str, storage=None) -> str:
    """The export folder on this machine (downloaded first when it lives on S3)."""
    if export_dir.startswith("s3://"):
        fs = storage.filesystem(export_dir)
        local = Path(os.environ.get("TMPDIR", "/tmp")) / f"export-{os.getpid()}-{abs(hash(export_dir))}"
        fs.get(export_dir.removeprefix("s3://") + "/", str(local), recursive=True)
        return str(local)
    return export_dir


def export_weights(export_dir: str, storage=None) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(local_export(export_dir, storage), "model.safetensors"))


@pytest.fixture(scope="module")
def zero_runs(zero2_run, tiny_run_config, s3_server):
    """The same run (seed, data, steps) with ZeRO-2 on local storage (the conftest's) and ZeRO-3 on
    S3, where the S3 server dies once two checkpoints are up: the run must fail with a clear error,
    and its rerun resume from a whole checkpoint and end at the right step and sample count, with
    one MLflow run, weights that agree with ZeRO-2's (to the stages' tolerance) and only the kept
    checkpoints (one run serves the ZeRO-3 checks and the fault: each costs ~1 min; the exact resume
    is checked to 1e-5 on local storage, in test_resume.py). A planted MLflow password travels in the
    environment only; the S3 keys are in the run config as well as the environment (the config's
    win, so they must reach the workers intact). ``zero_runs["outage"]`` is the first run's error."""
    secrets = {"MLFLOW_TRACKING_PASSWORD": PLANTED_PASSWORD, "MLFLOW_TRACKING_USERNAME": "u"}
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**s3_server.env(), **secrets}.items():
            env.setenv(key, value)
        raw = tiny_run_config(
            "s3://test-bucket/train-runs", "zero3", "test-train", zero_stage=3, checkpoint_every=1
        )
        raw["data"]["storage"] = {
            "access_key": s3_server.access_key,
            "secret_key": s3_server.secret_key,
            "retries": 2,
            "connect_timeout_s": 2.0,
            "read_timeout_s": 5.0,
        }
        cfg = parse_run_config(raw)
        outage = _fail_by_s3_outage(cfg, s3_server)
        zero3 = (cfg, run_training(cfg))  # Ray resumes from the last checkpoint it registered
    return {2: zero2_run, 3: zero3, "outage": outage}


def _fail_by_s3_outage(cfg, s3_server) -> BaseException:
    """Run ``cfg`` and kill the S3 server once two checkpoints are on it; returns the run's error."""
    fs = cfg.data.storage.filesystem(cfg.run_dir())
    prefix = cfg.run_dir().removeprefix("s3://")

    def checkpoints() -> int:
        try:
            return sum("checkpoint_step" in p for p in fs.ls(prefix, refresh=True))
        except FileNotFoundError:
            return 0

    pool = ThreadPoolExecutor(1)  # not a `with`: its exit would wait for a hung run forever
    run = pool.submit(run_training, cfg)
    assert wait_until(lambda: checkpoints() >= 2 or run.done(), timeout=600)
    assert not run.done(), run.exception() or run.result()
    s3_server.kill()
    try:
        error = run.exception(timeout=600)  # TimeoutError: training hung after the S3 server died
        assert error is not None, "the run cannot succeed with its storage gone"
    finally:
        s3_server.restart()
        pool.shutdown(wait=False)
    return error


def test_s3_outage_during_checkpoint_upload_fails_clearly(zero_runs):
    message = str(zero_runs["outage"])
    assert "checkpoint" in message.lower() or "s3" in message.lower() or "connect" in message.lower(), message


@pytest.mark.parametrize("stage", [2, 3])
def test_loss_falls_and_counts_are_exact(zero_runs, stage):
    cfg, result = zero_runs[stage]
    assert result.metrics["step"] == STEPS
    assert result.metrics["samples"] == SAMPLES
    client, runs = mlflow_run(cfg)
    assert len(runs) == 1
    curve = losses(client, runs[0].info.run_id)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = curve[1], sum(curve[s] for s in (STEPS - 1, STEPS)) / 2
    assert last < 0.8 * first, curve


def test_mlflow_has_params_metrics_checkpoints_and_the_export(zero_runs):
    cfg, _ = zero_runs[2]
    client, (run,) = mlflow_run(cfg)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == "2"
    assert run.data.params["train.global_batch_size"] == "8"
    for metric in (
        "loss",
        "learning_rate",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "data_wait_share",
        "val_loss",
    ):
        assert metric in run.data.metrics, metric
    assert 0.0 <= run.data.metrics["data_wait_share"] <= 1.0
    # Checkpoints at steps 3, 6 and 8; Ray keeps the newest two folders, and the tags follow.
    kept = {f"checkpoint_step_{step:07d}" for step in (6, STEPS)}
    assert {p.name for p in Path(cfg.run_dir()).glob("checkpoint_step_*")} == kept
    checkpoint_tags = {k: v for k, v in run.data.tags.items() if k.startswith("checkpoint.")}
    assert checkpoint_tags == {
        "checkpoint.latest": f"{cfg.run_dir()}/checkpoint_step_{STEPS:07d}",
        **{f"checkpoint.{name}": f"{cfg.run_dir()}/{name}" for name in kept},
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/dragonfly_processor.json"} <= artifacts


def test_checkpoint_holds_the_exported_weights(zero_runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg, result = zero_runs[2]
    exported = export_weights(cfg.export_dir())
    with result.checkpoint.as_directory() as folder:
        restored = get_fp32_state_dict_from_zero_checkpoint(folder, tag=DEEPSPEED_TAG)
    trainable = [k for k in restored if k in exported]
    assert len(trainable) == len(exported)
    for key in trainable:
        torch.testing.assert_close(
            restored[key], exported[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_zero3_export_equals_zero2_export(zero_runs, s3_env):
    # ZeRO-2 keeps whole parameters on every rank; ZeRO-3 partitions and gathers them.
    cfg2, _ = zero_runs[2]
    cfg3, _ = zero_runs[3]
    dir2, dir3 = local_export(cfg2.export_dir()), local_export(cfg3.export_dir(), cfg3.data.storage)
    w2, w3 = (load_file(os.path.join(d, "model.safetensors")) for d in (dir2, dir3))
    assert {k: (v.shape, v.dtype) for k, v in w2.items()} == {k: (v.shape, v.dtype) for k, v in w3.items()}
    # The stages sum gradients in different orders, and Adam turns last-bit noise in gradients that
    # are zero in exact arithmetic (attention key biases) into steps of up to lr. So: the weights as a
    # whole agree to 1e-4 relative (a mis-gathered or missing shard is off by ~1), and the two
    # models compute the same outputs.
    diff = sum(float((w3[k] - w2[k]).double().pow(2).sum()) for k in w2) ** 0.5
    norm = sum(float(w2[k].double().pow(2).sum()) for k in w2) ** 0.5
    assert diff < 1e-4 * norm, (diff, norm)

    m2, m3 = (DragonflyModel.from_pretrained(d).eval() for d in (dir2, dir3))
    r, image_id = m2.config.zoom.resolution, m2.config.image_token_id
    text = [t for t in range(1, 9) if t != image_id]
    input_ids = torch.tensor([text[:3] + [image_id] * m2.layout.positions + text[3:6]])
    pixels = torch.randint(0, 256, (1, m2.layout.n_crops, 3, r, r), dtype=torch.uint8)
    with torch.no_grad():
        logits2 = m2(input_ids=input_ids, pixels=pixels).logits
        logits3 = m3(input_ids=input_ids, pixels=pixels).logits
    torch.testing.assert_close(logits3, logits2, rtol=1e-3, atol=1e-4)


def test_zero3_checkpoints_live_on_s3_with_every_rank_shard(zero_runs, s3_env):
    cfg, result = zero_runs[3]
    fs = cfg.data.storage.filesystem(cfg.run_dir())
    with result.checkpoint.as_directory() as folder:
        files = {p.name for p in Path(folder).rglob("*") if p.is_file()}
    assert {"train_state_rank0.json", "train_state_rank1.json"} <= files
    assert sum(name.startswith("zero_pp_rank_") for name in files) >= 2  # one shard set per rank
    # Folders that still hold objects (SeaweedFS lists a deleted folder as an empty prefix), not
    # the listing cached while the outage was waited for.
    fs.invalidate_cache()
    stored = fs.find(cfg.run_dir().removeprefix("s3://"))
    checkpoints = sorted({m.group(0) for p in stored if (m := re.search(r"checkpoint_step_\d+", p))})
    assert checkpoints == ["checkpoint_step_0000007", "checkpoint_step_0000008"]
    _, (run,) = mlflow_run(cfg)
    checkpoint_tags = {k: v for k, v in run.data.tags.items() if k.startswith("checkpoint.")}
    assert checkpoint_tags == {
        "checkpoint.latest": f"{cfg.run_dir()}/checkpoint_step_0000008",
        **{f"checkpoint.{name}": f"{cfg.run_dir()}/{name}" for name in checkpoints},
    }


def test_rerun_of_a_finished_run_keeps_its_checkpoints(zero_runs):
    """The ZeRO-2 run checkpointed at steps 3 and 6 and, off that grid, at its last step 8. Running
    it again resumes at step 8 with nothing left to do: it must not save checkpoint_step_0000008 a
    second time (Ray would then hold two entries for one folder and, once the older one is evicted,
    delete the folder the newer one needs)."""
    import json

    cfg, first = zero_runs[2]
    snapshot = Path(cfg.run_dir()) / "checkpoint_manager_snapshot.json"

    def registered() -> list[str]:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]

    assert registered() == ["checkpoint_step_0000006", "checkpoint_step_0000008"]
    again = run_training(cfg)
    assert registered() == ["checkpoint_step_0000006", "checkpoint_step_0000008"]
    assert sorted(p.name for p in Path(cfg.run_dir()).glob("checkpoint_step_*")) == registered()
    assert Path(again.checkpoint.path).name == "checkpoint_step_0000008"
    client, (run,) = mlflow_run(cfg)
    assert sorted(losses(client, run.info.run_id)) == list(range(1, STEPS + 1))  # no step trained twice


def test_no_credentials_in_logs_params_or_artifacts(
    zero_runs, s3_server, s3_env, mlflow_server, ray_cluster, tmp_path
):
    import mlflow.artifacts
    import ray

    secrets = [s3_server.secret_key, PLANTED_PASSWORD]
    cfg, _ = zero_runs[3]
    client, (run,) = mlflow_run(cfg)
    recorded = [
        *run.data.params.items(),
        *run.data.tags.items(),
        *((k, str(v)) for k, v in run.data.metrics.items()),
    ]
    for key, value in recorded:
        assert not any(s in key or s in value for s in secrets), key

    def assert_clean(folder: Path, what: str):
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), f"{what}: {path}"

    artifacts = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts"), tracking_uri=cfg.tracking_uri()
    )
    assert_clean(Path(artifacts), "MLflow artifacts")
    # Every file of the run folder on S3 (checkpoints, processor, export).
    local_copy = tmp_path / "run"
    cfg.data.storage.filesystem(cfg.run_dir()).get(
        cfg.run_dir().removeprefix("s3://") + "/", str(local_copy), recursive=True
    )
    assert_clean(local_copy, "run folder")
    # Driver, controller and worker logs of the whole Ray session.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert_clean(session / "logs", "Ray logs")


def test_bad_records_over_budget_stop_the_run_at_once_despite_max_failures(
    ray_cluster, tiny_run_config, tmp_path
):
    """Ray Train retries every worker error up to max_failures; a dataset over its bad-record
    budget fails the same way on every attempt, so the first failure must end the run, with the
    error itself (not Ray's wrapper) and the MLflow run marked FAILED."""
    from dragonfly_platform.demo_data import write_demo_dataset
    from dragonfly_platform.train import build_trainer, fit, prepare_run

    class CountWorkerErrors(UserCallback):  # local: pickled by value to Ray Train's controller
        def __init__(self, path: str):
            self.path = path

        def after_exception(self, run_context, worker_exceptions):  # once per failed attempt
            with open(self.path, "a") as f:
                f.write(f"{sorted(type(e).__name__ for e in worker_exceptions.values())}\n")

    demo = write_demo_dataset(tmp_path / "demo", 8, 2, 0, with_bad_records=True)
    raw = tiny_run_config(str(tmp_path / "runs"), "over-budget", "test-train")
    raw["run"].update(max_failures=2, num_workers=1)
    raw["data"].update(
        train_manifest=demo["train_manifest"],
        val_manifest=demo["val_manifest"],
        max_bad_fraction=0.0,
        min_records_for_bad_fraction=1,
    )
    cfg = parse_run_config(raw).with_absolute_paths()
    prepared = prepare_run(cfg)
    attempts = tmp_path / "attempts.txt"
    with pytest.raises(TooManyBadRecords, match=r"over max_bad_fraction=0\.0%.* listed in .*/bad_records/"):
        fit(build_trainer(cfg, [CountWorkerErrors(str(attempts))], prepared), cfg, prepared)
    assert attempts.read_text().splitlines() == ["['TooManyBadRecords']"]  # one attempt, no retry
    client, (run,) = mlflow_run(cfg)
    assert run.info.status == "FAILED"
