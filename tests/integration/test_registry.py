"""Registry promotion against a real `mlflow server` (SQLite backend, artifacts on S3): register,
gate, refuse, rollback, idempotent reruns, the lock and the champion compare-and-set under races,
and the pyfunc model loading and answering.

Runs are logged the way jobs/train.py logs a finished training run (its export under the run's
``model/`` artifacts). The gate tests inject the evaluation (scores per run), so decisions are
deterministic; the pyfunc test runs real generation with a tiny random model.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dragonfly_platform.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    LOCK_TAG,
    PREVIOUS_CHAMPION_TAG,
    REASON_TAG,
    GateConfig,
    LockHolder,
    PromoteConfig,
    PromotionConflict,
    PromotionError,
    promote,
    rollback,
)

EXPERIMENT = "registry-tests"


def write_tiny_export(directory: str, seed: int) -> str:
    """A random tiny model + processor in ``save_pretrained`` layout (what training exports)."""
    import torch

    from dragonfly.model import DragonflyConfig, DragonflyModel
    from dragonfly.processor import DragonflyProcessor
    from dragonfly.tiny import build_tiny_tokenizer

    preset = DragonflyConfig.tiny(vocab_size=1, image_token_id=0)
    processor = DragonflyProcessor(build_tiny_tokenizer(), preset.zoom, preset.tokens, max_length=1024)
    torch.manual_seed(seed)
    config = DragonflyConfig.tiny(len(processor.tokenizer), processor.image_token_id)
    DragonflyModel(config, load_weights=False).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def log_training_run(client: MlflowClient, export_dir: str, name: str = "tiny") -> str:
    """A finished MLflow run holding ``export_dir`` as its ``model/`` artifacts; returns its id."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    client.log_artifacts(run_id, export_dir, "model")
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def client(mlflow_server, monkeypatch_module):
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    monkeypatch_module.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(mlflow_server.tracking_uri)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_tiny_export(str(tmp_path_factory.mktemp("export")), seed=0)


@pytest.fixture(scope="module")
def runs(client, export_dir):
    """Five training runs sharing one export (the gate sees injected scores, not the weights)."""
    return [log_training_run(client, export_dir, f"tiny-{i}") for i in range(5)]


def config(name: str, **overrides) -> PromoteConfig:
    return PromoteConfig(
        registered_model=name,
        eval={"data": "held-out.jsonl"},
        gate=GateConfig(thresholds={"exact_match": 0.5}, max_regression={"exact_match": 0.05}),
        lock_settle_s=0.5,
        **overrides,
    )


class ScoresByRun:
    """The injected evaluation: a pinned ``models:/<name>/<version>`` URI -> that run's scores."""

    def __init__(self, client: MlflowClient, scores: dict[str, float], delay_s: float = 0.0):
        self.client, self.scores, self.delay_s = client, scores, delay_s
        self.evaluated: list[str] = []

    def __call__(self, uri: str) -> dict[str, float]:
        name, version = uri.removeprefix("models:/").rsplit("/", 1)
        run_id = self.client.get_model_version(name, version).run_id
        self.evaluated.append(version)
        time.sleep(self.delay_s)
        return {"exact_match": self.scores[run_id], "token_f1": self.scores[run_id]}


def alias(client: MlflowClient, name: str, which: str) -> str:
    return str(client.get_model_version_by_alias(name, which).version)


def versions_of(client: MlflowClient, name: str) -> dict[str, str]:
    return {v.run_id: str(v.version) for v in client.search_model_versions(f"name = '{name}'")}


def test_promote_refuse_rerun_and_rollback(client, runs):
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    first, better, worse = runs[:3]
    evaluate = ScoresByRun(client, {first: 0.60, better: 0.75, worse: 0.69})
    cfg = config(name)

    result = promote(client, first, cfg, evaluate)
    assert (result.decision, result.champion_before, result.champion_after) == ("promoted", None, "1")
    assert evaluate.evaluated == ["1"]  # no champion to compare with
    assert alias(client, name, CHAMPION) == alias(client, name, CHALLENGER) == "1"
    tags = client.get_model_version(name, "1").tags
    assert tags[DECISION_TAG] == "promoted" and tags[PREVIOUS_CHAMPION_TAG] == ""
    assert tags["score.exact_match"] == "0.6"

    # Rerunning the same promotion changes nothing and registers nothing new.
    again = promote(client, first, cfg, evaluate)
    assert again.decision == "already_champion" and again.version == "1"
    assert versions_of(client, name) == {first: "1"}

    result = promote(client, better, cfg, evaluate)
    assert (result.decision, result.champion_before, result.champion_after) == ("promoted", "1", "2")
    assert evaluate.evaluated[-2:] == ["2", "1"]  # challenger and champion on the same set
    assert client.get_model_version(name, "2").tags[PREVIOUS_CHAMPION_TAG] == "1"

    # 0.69 passes the threshold but is more than 0.05 below the champion's 0.75: refused.
    result = promote(client, worse, cfg, evaluate)
    assert result.decision == "refused" and not result.promoted
    assert alias(client, name, CHAMPION) == "2" and alias(client, name, CHALLENGER) == "3"
    tags = client.get_model_version(name, "3").tags
    assert tags[DECISION_TAG] == "refused"
    assert tags[REASON_TAG].startswith("exact_match 0.7500 -> 0.6900 (regressed beyond tolerance 0.0500)")
    assert tags["promotion.compared_to"] == "2"
    # A refused challenger's rerun is refused again on the same version.
    assert promote(client, worse, cfg, evaluate).decision == "refused"
    assert versions_of(client, name) == {first: "1", better: "2", worse: "3"}

    assert rollback(client, name, settle_s=0.1) == ("2", "1")
    assert alias(client, name, CHAMPION) == "1"
    assert client.get_model_version(name, "2").tags[DECISION_TAG] == "rolled_back"
    with pytest.raises(PromotionError, match="v1 .* was the first champion"):
        rollback(client, name, settle_s=0.1)
    assert LOCK_TAG not in client.get_registered_model(name).tags


def test_two_concurrent_promotions_one_loses_cleanly(client, runs):
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    a, b = runs[3], runs[4]
    evaluate = ScoresByRun(client, {runs[0]: 0.6, a: 0.8, b: 0.9}, delay_s=2.0)
    cfg = config(name)
    promote(client, runs[0], config(name), ScoresByRun(client, {runs[0]: 0.6}))  # v1 is champion
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def attempt(run_id: str) -> None:
        start.wait()
        try:
            outcomes[run_id] = promote(client, run_id, cfg, evaluate)
        except Exception as err:  # recorded so the assertion below shows any unexpected failure
            outcomes[run_id] = err

    threads = [threading.Thread(target=attempt, args=(r,)) for r in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)

    winners = [r for r, o in outcomes.items() if not isinstance(o, Exception)]
    losers = [r for r, o in outcomes.items() if isinstance(o, PromotionConflict)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    (winner,), (loser,) = winners, losers
    assert outcomes[winner].decision == "promoted"
    # The loser stopped before touching the registry: no version, aliases are the winner's.
    registered = versions_of(client, name)
    assert loser not in registered
    assert alias(client, name, CHAMPION) == alias(client, name, CHALLENGER) == registered[winner]
    assert LOCK_TAG not in client.get_registered_model(name).tags


def test_champion_moved_during_evaluation_aborts_without_changes(client, runs):
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    base, challenger, intruder = runs[0], runs[1], runs[2]
    promote(client, base, config(name), ScoresByRun(client, {base: 0.6}))
    promote(client, intruder, config(name), ScoresByRun(client, {intruder: 0.5, base: 0.6}))  # refused: v2
    scores = ScoresByRun(client, {challenger: 0.9, base: 0.6})

    def evaluate_while_someone_moves_champion(uri: str) -> dict[str, float]:
        # Someone bypassing the lock (a person in the UI, an old client) moves champion meanwhile.
        client.set_registered_model_alias(name, CHAMPION, "2")
        return scores(uri)

    with pytest.raises(PromotionConflict, match="champion moved during promotion from v1 to v2; .* rerun"):
        promote(client, challenger, config(name), evaluate_while_someone_moves_champion)
    assert alias(client, name, CHAMPION) == "2"
    assert DECISION_TAG not in client.get_model_version(name, "3").tags
    assert LOCK_TAG not in client.get_registered_model(name).tags


def test_a_held_lock_refuses_and_a_stale_one_is_taken_over(client, runs):
    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    holder = LockHolder(owner="other-host:42:cafe", since=time.time(), action="promote run x")
    client.set_registered_model_tag(name, LOCK_TAG, holder.to_json())
    evaluate = ScoresByRun(client, {runs[0]: 0.6})
    with pytest.raises(PromotionConflict, match="locked by other-host:42:cafe \\(promote run x\\)"):
        promote(client, runs[0], config(name), evaluate)
    assert client.search_model_versions(f"name = '{name}'") == []

    stale = LockHolder(owner="dead-host:1:beef", since=time.time() - 7200, action="promote run y")
    client.set_registered_model_tag(name, LOCK_TAG, stale.to_json())
    result = promote(client, runs[0], config(name, lock_stale_after_s=3600), evaluate)
    assert result.decision == "promoted"
    assert LOCK_TAG not in client.get_registered_model(name).tags


def test_registered_pyfunc_model_loads_and_answers(client, runs, export_dir, tmp_path, tiny_run_config):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from dragonfly.model import DragonflyModel
    from dragonfly.processor import DragonflyProcessor

    name = f"Dragonfly-{uuid.uuid4().hex[:6]}"
    promote(client, runs[0], config(name), ScoresByRun(client, {runs[0]: 0.6}))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    image = (tmp_path / "photo.png").read_bytes()
    question = [{"role": "user", "content": "What is in the image?"}]
    arithmetic = [{"from": "human", "value": "What is 2 plus 3?"}]

    served = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}", model_config={"device": "cpu"})
    frame = pd.DataFrame({"image": [image, None], "messages": [question, arithmetic]})
    answers = served.predict(frame, params={"max_new_tokens": 6})
    assert list(answers.columns) == ["answer"] and len(answers) == 2

    # The same answers as the exported model itself (greedy), from JSON-style input too.
    model = DragonflyModel.from_pretrained(export_dir).eval()
    processor = DragonflyProcessor.from_pretrained(export_dir)
    expected = model.generate_text(processor, [image, None], [question, arithmetic], max_new_tokens=6)
    assert answers["answer"].tolist() == expected
    as_json = pd.DataFrame({"image": [base64.b64encode(image).decode()], "messages": [json.dumps(question)]})
    alone = model.generate_text(processor, [image], [question], max_new_tokens=6)
    assert served.predict(as_json, params={"max_new_tokens": 6})["answer"].tolist() == alone

    # `train.init_from: models:/<name>@champion` (the Med recipes start from the general model): the
    # registered pyfunc's weights and processor, as training's driver and workers load them.
    from dragonfly_platform.evaluate import fetched_model
    from dragonfly_platform.storage import StorageConfig

    with fetched_model(f"models:/{name}@{CHAMPION}", StorageConfig()) as init_dir:
        loaded = DragonflyModel.from_pretrained(init_dir).state_dict()
        assert (
            DragonflyProcessor.from_pretrained(init_dir).tokenizer.get_vocab()
            == processor.tokenizer.get_vocab()
        )
    assert not Path(init_dir).exists()  # the download is removed
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # A run's driver pins the alias once, so its processor, every worker and every retry load one
    # version (promotion may move the alias meanwhile), and the run's params name it.
    from dragonfly_platform.config import parse_run_config
    from dragonfly_platform.train import prepare_run

    raw = tiny_run_config(str(tmp_path / "runs"), "from-registry", EXPERIMENT)
    del raw["model"]
    raw["processor"] = {"max_length": 1024}
    raw["train"]["init_from"] = f"models:/{name}@{CHAMPION}"
    prepared = prepare_run(parse_run_config(raw))
    assert prepared.run_config.train.init_from == f"models:/{name}/1"
    written = DragonflyProcessor.from_pretrained(prepared.processor_dir)
    assert written.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

    # A rerun of that run (after a crash) keeps version 1 though the alias has moved to 2: its params
    # (immutable in MLflow) say 1, and its checkpoint was trained from 1. A fresh run takes 2.
    from dragonfly_platform.tracking import RankZeroTracker

    RankZeroTracker(prepared.run_config, prepared.mlflow_run_id, rank=0).log_params(
        prepared.run_config.flatten()
    )  # as the first attempt's rank 0 does when training starts
    promote(client, runs[1], config(name), ScoresByRun(client, {runs[0]: 0.6, runs[1]: 0.7}))
    assert alias(client, name, CHAMPION) == "2"
    rerun = prepare_run(parse_run_config(raw))
    assert rerun.mlflow_run_id == prepared.mlflow_run_id
    assert rerun.run_config.train.init_from == f"models:/{name}/1"
    raw["run"]["name"] = "from-registry-later"
    assert prepare_run(parse_run_config(raw)).run_config.train.init_from == f"models:/{name}/2"
    # That run's first attempt never started training (no params): its rerun follows the alias.
    client.set_registered_model_alias(name, CHAMPION, "1")
    assert prepare_run(parse_run_config(raw)).run_config.train.init_from == f"models:/{name}/1"
