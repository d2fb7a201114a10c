"""The evaluation job: Ray Data replicas generating over the demo validation split, per-sample and
corpus scores, the table and metrics in MLflow, and model URIs of every kind (registry alias, s3://).
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_registry import log_training_run, write_tiny_export

from dragonfly_platform.evaluate import (
    EvalConfig,
    EvaluationError,
    eval_row,
    evaluate_model,
    score_table,
    weights_dir,
)
from dragonfly_platform.manifest import ManifestRecord, read_manifest
from dragonfly_platform.registry import register_challenger

REPO = Path(__file__).resolve().parents[2]
N_VAL = 6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from dragonfly_platform.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=1, n_val=N_VAL, seed=0)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_tiny_export(str(tmp_path_factory.mktemp("export")), seed=1)


@pytest.fixture
def client(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(mlflow_server.tracking_uri)


def test_eval_rows_split_the_final_answer_off_as_reference():
    turns = [
        {"from": "human", "value": "<image>\nWhat is this?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "What colour is it?"},
        {"from": "gpt", "value": "Ginger."},
    ]
    row = eval_row(3, ManifestRecord("r1", "images/cat.png", turns, line=4), "/data")
    assert row["image"] == "/data/images/cat.png" and row["reference"] == "Ginger."
    assert json.loads(row["messages"]) == turns[:3] and row["error"] is None

    unanswered = eval_row(0, ManifestRecord("r2", None, turns[:1], line=1), "/data")
    assert unanswered["error"] == "record r2: no final assistant answer to compare with"
    assert unanswered["image"] is None


def test_too_many_failed_samples_stop_the_evaluation():
    table = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "reference": ["7", "cat", "blue", "12"],
            "prediction": ["7", "", "", "13"],
            "error": [None, "record b: missing image x.png", "record c: truncated", None],
        }
    )
    with pytest.raises(
        EvaluationError, match=r"2 of 4 samples .*\n  record b: missing image x.png\n  record c"
    ):
        score_table(table.copy(), "exact", max_error_fraction=0.25)
    metrics = score_table(table, "exact", max_error_fraction=0.5)
    assert metrics == {"exact_match": 0.5, "n_samples": 4.0, "n_errors": 2.0}
    assert table["exact_match"].tolist()[::3] == [1.0, 0.0] and table["exact_match"].isna().tolist()[1:3] == [
        True,
        True,
    ]


def test_weights_dir_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a Dragonfly export .* nor an MLflow model"):
        weights_dir(str(tmp_path))


def test_a_model_that_is_not_there_is_bad_input(client, ray_cluster, s3_env, demo, tmp_path, capsys):
    """Exit 2 with the reason, found on the driver: a registry name (case-sensitive), alias or
    version that does not exist, a folder without a model, an S3 prefix with nothing under it."""
    job = load_job("evaluate")
    args = ["--data", demo["val_manifest"], "--tracking-uri", client.tracking_uri, "--no-log"]
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    for model, reason in [
        (f"models:/{name.lower()}@champion", f"Registered Model with name={name.lower()} not found"),
        (f"models:/{name}@champion", "alias champion not found"),
        (f"models:/{name}/3", f"Model Version \\(name={name}, version=3\\) not found"),
        (str(tmp_path), "neither a Dragonfly export"),
        ("s3://test-bucket/no-such-model", "nothing is stored under this prefix"),
    ]:
        assert job.main(["--model", model, *args]) == 2, model
        assert re.search(f"error: (model )?{re.escape(model)}:? .*{reason}", capsys.readouterr().err), model


def test_evaluation_of_a_registry_alias_logs_on_the_models_run(client, ray_cluster, demo, export_dir):
    """The demo validation split through the job: alias -> pinned version, predictions from the
    replicas equal the model's own greedy answers, metrics and table land on the training run."""
    from dragonfly.model import DragonflyModel
    from dragonfly.processor import DragonflyProcessor

    run_id = log_training_run(client, export_dir, "eval-source")
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    version = register_challenger(client, run_id, name)
    # One batch of all samples, so the comparison below batches (and pads) exactly alike.
    cfg = EvalConfig(data=demo["val_manifest"], task="open", max_new_tokens=6, batch_size=N_VAL, num_cpus=0.5)

    result = evaluate_model(f"models:/{name}@challenger", cfg, tracking_uri=client.tracking_uri)

    assert result.model.pinned_uri == f"models:/{name}/{version}"
    assert result.run_id == run_id
    records = read_manifest(demo["val_manifest"])
    table = result.table
    assert table["id"].tolist() == [r.id for r in records]
    assert table["error"].isna().all(), table["error"].tolist()
    assert table["reference"].tolist() == [r.conversations[-1]["value"] for r in records]
    for metric in ("token_f1", "exact_match"):
        assert result.metrics[metric] == pytest.approx(table[metric].mean())
    assert result.metrics["n_samples"] == N_VAL and result.metrics["n_errors"] == 0

    model = DragonflyModel.from_pretrained(export_dir).eval()
    processor = DragonflyProcessor.from_pretrained(export_dir)
    root = Path(demo["val_manifest"]).parent
    images = [(root / r.image).read_bytes() if r.has_image else None for r in records]
    prompts = [r.conversations[:-1] for r in records]
    assert table["prediction"].tolist() == model.generate_text(processor, images, prompts, max_new_tokens=6)

    logged = client.get_run(run_id).data
    assert logged.metrics["eval/val/token_f1"] == pytest.approx(result.metrics["token_f1"])
    assert logged.metrics["eval/val/n_samples"] == N_VAL
    assert logged.tags["eval.val.model_uri"] == f"models:/{name}/{version}"
    assert {a.path for a in client.list_artifacts(run_id, "eval/val")} == {
        "eval/val/predictions.parquet",
        "eval/val/predictions.csv",
    }
    downloaded = client.download_artifacts(
        run_id, "eval/val/predictions.parquet", str(Path(export_dir).parent)
    )
    assert pd.read_parquet(downloaded)["prediction"].tolist() == table["prediction"].tolist()


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_job_with_an_s3_model_and_bad_samples(
    client, ray_cluster, s3_env, demo, export_dir, tmp_path
):
    """``jobs/evaluate.py`` on a model under s3://, a manifest with a missing and an undecodable
    image: those two samples get errors and are left out of the scores; a new evaluation run holds
    the metrics; ``--out`` gets the table."""
    s3_env.pyarrow_filesystem().create_dir("test-bucket/models/tiny")
    import pyarrow.fs

    pyarrow.fs.copy_files(
        export_dir, "test-bucket/models/tiny", destination_filesystem=s3_env.pyarrow_filesystem()
    )
    root = Path(demo["val_manifest"]).parent
    (tmp_path / "not_an_image.png").write_bytes(b"plain text, not a PNG\n")
    good = [json.loads(line) for line in Path(demo["val_manifest"]).read_text().splitlines()][:2]
    for record in good:
        if "image" in record:
            record["image"] = str(root / record["image"])
    ask = [{"from": "human", "value": "What is in the image?"}, {"from": "gpt", "value": "A rocket."}]
    bad = [
        {"id": "missing", "image": str(tmp_path / "gone.png"), "conversations": ask},
        {"id": "undecodable", "image": str(tmp_path / "not_an_image.png"), "conversations": ask},
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    out = tmp_path / "out"

    status = load_job("evaluate").main(
        [
            "--model", "s3://test-bucket/models/tiny",
            "--data", str(manifest),
            "--task", "exact",
            "--max-new-tokens", "4",
            "--batch-size", "4",
            "--num-cpus", "0.5",
            "--max-error-fraction", "0.5",
            "--new-run",
            "--out", str(out),
            "--tracking-uri", client.tracking_uri,
        ]
    )  # fmt: skip
    assert status == 0

    table = pd.read_parquet(out / "predictions.parquet")
    assert table["id"].tolist() == [good[0]["id"], good[1]["id"], "missing", "undecodable"]
    errors = table.set_index("id")["error"]
    assert "missing image" in errors["missing"]
    assert errors["undecodable"].startswith("record undecodable:")
    assert errors[[good[0]["id"], good[1]["id"]]].isna().all()
    assert table["exact_match"].isna().tolist() == [False, False, True, True]
    assert pd.read_csv(out / "predictions.csv")["id"].tolist() == table["id"].tolist()

    runs = client.search_runs(
        [client.get_experiment_by_name("dragonfly-eval").experiment_id],
        filter_string="tags.`dragonfly.model_uri` = 's3://test-bucket/models/tiny'",
    )
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["eval/mixed/n_samples"] == 4 and metrics["eval/mixed/n_errors"] == 2
    assert metrics["eval/mixed/exact_match"] == pytest.approx(table["exact_match"].iloc[:2].mean())
    assert runs[0].info.status == "FINISHED"


def test_promote_job_evaluates_with_ray_and_exits_by_decision(
    client, ray_cluster, demo, export_dir, tmp_path
):
    """``jobs/promote.py`` with the real evaluator: the first run becomes champion; a second run that
    misses an exact-match threshold is refused (exit 3) and leaves champion alone."""
    import yaml

    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    first, second = (log_training_run(client, export_dir, f"promote-{i}") for i in range(2))
    evaluation = {
        "data": demo["val_manifest"],
        "limit": 2,
        "max_new_tokens": 2,
        "batch_size": 2,
        "num_cpus": 0.5,
    }
    configs = {}
    for kind, gate in (
        ("lenient", {"thresholds": {"token_f1": 0.0}}),
        ("strict", {"thresholds": {"exact_match": 1.01}}),
    ):
        configs[kind] = tmp_path / f"promote_{kind}.yaml"
        configs[kind].write_text(yaml.safe_dump({"registered_model": name, "eval": evaluation, "gate": gate}))
    promote_job = load_job("promote")

    def run(*args: str) -> int:
        return promote_job.main([*args, "--tracking-uri", client.tracking_uri])

    assert run("--run", first, "--config", str(configs["lenient"])) == 0
    assert run("--run", second, "--config", str(configs["strict"])) == promote_job.EXIT_REFUSED
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    refused = client.get_model_version(name, "2").tags
    assert refused["promotion.decision"] == "refused"
    assert (
        refused["promotion.reason"].startswith("exact_match ")
        and "< threshold 1.0100" in refused["promotion.reason"]
    )
    # Each evaluation was logged on the evaluated version's own run.
    assert client.get_run(second).data.metrics["eval/val/n_samples"] == 2
    assert "eval/val/exact_match" in client.get_run(first).data.metrics
    assert (
        run("--rollback", "--registered-model", name, "--config", str(configs["lenient"])) == 2
    )  # first champion
