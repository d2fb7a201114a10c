"""Sweep configs, search spaces, upfront validation, resources, Pareto front and the results files:
everything of a sweep that needs no Ray cluster (sweep_config, sweep_results)."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dragonfly.budget import config_report
from dragonfly.config import ConfigError, TokenConfig, ZoomConfig
from dragonfly_platform.sweep_config import (
    GRID_KEY,
    IMAGE_TOKENS,
    TFLOPS,
    SweepConfig,
    build_param_space,
    derive_max_concurrent_trials,
    grid_points,
    image_budget,
    load_base,
    load_sweep_config,
    resolve_trial_config,
    trial_overrides,
    validate_sweep,
    validation_points,
)
from dragonfly_platform.sweep_results import pareto_front, trial_label, write_results

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
TINY_BASE = str(CONFIGS / "tiny_stage1.yaml")


def sweep_from(tmp_path, **fields) -> SweepConfig:
    raw = {"name": "t", "base": TINY_BASE, **fields}
    path = tmp_path / "sweep_t.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_sweep_config(path)


def tokens_of(point: dict) -> int:
    """Image tokens of a sweep point over the paper's default token config, by the calculator."""
    tokens = dict(TokenConfig().tokens)
    for level in ("low", "medium", "high"):
        tokens[level] = point.get(f"model.tokens.tokens.{level}", tokens[level])
    zoom = ZoomConfig(levels=tuple(point["model.zoom.levels"]))
    return config_report(zoom, TokenConfig(tokens=tuple(tokens.items())))["image_tokens"]


# -- the shipped recipes ---------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path):
    sweep = load_sweep_config(path)
    configs = validate_sweep(sweep, load_base(sweep))
    assert len(configs) == len(validation_points(sweep)) > 0


def test_sweep_pooling_is_the_appendix_c_grid():
    sweep = load_sweep_config(CONFIGS / "sweep_pooling.yaml")
    points = grid_points(sweep.search)
    low_medium = [
        p["model.tokens.tokens.medium"] for p in points if p["model.zoom.levels"] == ["low", "medium"]
    ]
    low_high = [p["model.tokens.tokens.high"] for p in points if p["model.zoom.levels"] == ["low", "high"]]
    assert low_medium == [576, 144, 64, 36, 16]  # Table 7
    assert low_high == [64, 36, 16, 9]  # Table 8
    configs = validate_sweep(sweep, load_base(sweep))
    # 576 low tokens + 4 medium or 36 high sub-images at each count.
    assert [image_budget(c)[IMAGE_TOKENS] for c in configs] == [
        576 + 4 * 576, 576 + 4 * 144, 576 + 4 * 64, 576 + 4 * 36, 576 + 4 * 16,
        576 + 36 * 64, 576 + 36 * 36, 576 + 36 * 16, 576 + 36 * 9,
    ]  # fmt: skip
    assert [image_budget(c)[IMAGE_TOKENS] for c in configs] == [tokens_of(p) for p in points]


def test_sweep_levels_is_table_2():
    sweep = load_sweep_config(CONFIGS / "sweep_levels.yaml")
    configs = validate_sweep(sweep, load_base(sweep))
    budgets = {tuple(c.dragonfly_config().zoom.levels): image_budget(c) for c in configs}
    assert {levels: b[IMAGE_TOKENS] for levels, b in budgets.items()} == {
        ("low",): 576,
        ("medium",): 144,
        ("high",): 1296,
        ("low", "medium"): 720,
        ("low", "high"): 1872,
        ("low", "medium", "high"): 2016,
    }
    # TFLOPs come from the appendix-F calculator, not a second implementation.
    full = config_report(ZoomConfig(), TokenConfig())
    assert budgets[("low", "medium", "high")][TFLOPS] == pytest.approx(full["total_flops"] / 1e12)


def test_tiny_recipes_fit_a_four_cpu_test_cluster():
    for name in ("sweep_pooling_tiny.yaml", "sweep_levels_tiny.yaml"):
        sweep = load_sweep_config(CONFIGS / name)
        configs = validate_sweep(sweep, load_base(sweep))
        # 0.01 driver + 0.49 worker = 0.5 CPU per trial, 1 CPU kept for a crop task: 6 trials at
        # once on 4 logical CPUs.
        assert derive_max_concurrent_trials({"CPU": 4.0}, configs) == 6
        assert all(c.run.num_workers == 1 for c in configs)


# -- spaces ----------------------------------------------------------------------------------


def test_union_of_spaces_keeps_order_and_drops_duplicates(tmp_path):
    sweep = sweep_from(
        tmp_path,
        search=[
            {"model.projector": {"grid": ["linear", "mlp"]}, "model.pooling": {"grid": ["mean"]}},
            {"model.projector": {"grid": ["mlp"]}, "model.pooling": {"grid": ["mean", "perceiver"]}},
        ],
    )
    assert grid_points(sweep.search) == [
        {"model.projector": "linear", "model.pooling": "mean"},
        {"model.projector": "mlp", "model.pooling": "mean"},
        {"model.projector": "mlp", "model.pooling": "perceiver"},
    ]


def test_param_space_for_random_search_samples_and_grids(tmp_path):
    from ray.tune.search.sample import Categorical, Float

    sweep = sweep_from(
        tmp_path,
        algorithm="random",
        num_samples=3,
        search={
            "model.projector": {"grid": ["linear", "mlp"]},
            "model.pooling": {"choice": ["mean", "perceiver"]},
            "train.lr": {"loguniform": [1e-5, 1e-2]},
        },
    )
    space = build_param_space(sweep)
    assert space[GRID_KEY] == {"grid_search": [{"model.projector": "linear"}, {"model.projector": "mlp"}]}
    assert isinstance(space["model.pooling"], Categorical) and space["model.pooling"].categories == [
        "mean",
        "perceiver",
    ]
    assert isinstance(space["train.lr"], Float) and (space["train.lr"].lower, space["train.lr"].upper) == (
        1e-5,
        1e-2,
    )
    # Validation covers every choice at both ends of each continuous range.
    points = validation_points(sweep)
    assert len(points) == 2 * 2 * 2
    assert {p["train.lr"] for p in points} == {1e-5, 1e-2}
    config = {GRID_KEY: {"model.projector": "mlp"}, "model.pooling": "mean", "train.lr": 3e-4}
    assert trial_overrides(config) == {"model.projector": "mlp", "model.pooling": "mean", "train.lr": 3e-4}


def test_bayesian_space_has_only_sampled_axes(tmp_path):
    sweep = load_sweep_config(CONFIGS / "sweep_projector_bayesian.yaml")
    space = build_param_space(sweep)
    assert GRID_KEY not in space and set(space) == {"model.projector", "model.pooling", "train.lr"}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"search": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}, "algorithm 'grid' takes only grid axes"),
        (
            {"algorithm": "bayesian", "search": {"model.projector": {"grid": ["linear", "mlp"]}}},
            "make ['model.projector'] 'choice' axes",
        ),
        ({"search": {"run.storage_path": {"grid": ["a", "b"]}}}, "'run.storage_path' cannot vary"),
        ({"search": {"mlflow.experiment": {"grid": ["a", "b"]}}}, "'mlflow.experiment' cannot vary"),
        (
            {"overrides": {"run.name": "x"}, "search": {"train.lr": {"grid": [1e-3]}}},
            "'run.name' is set by the sweep",
        ),
        ({"search": {"train.lr": {"grid": [1e-3], "choice": [1e-2]}}}, "give exactly one of"),
        ({"algorithm": "random", "search": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
        ({"algorithm": "random", "search": {"train.lr": {"uniform": [2, 1]}}}, "needs low < high"),
        ({"search": {"train.lr": {"grid": []}}}, "needs at least one value"),
        (
            {
                "algorithm": "random",
                "search": [
                    {"model.projector": {"grid": ["mlp"]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
                    {"model.projector": {"grid": ["linear"]}},
                ],
            },
            "sampled axes (choice/uniform/loguniform) must be the same in every space",
        ),
        (
            {"search": {"train.lr": {"grid": [1e-3]}}, "scheduler": {"grace_period": 5, "max_t": 2}},
            "grace_period=5 must be below max_t=2",
        ),
        (
            {"search": {"train.lr": {"grid": [1e-3]}}, "scheduler": {"grace_period": 3, "max_t": 3}},
            "grace_period=3 must be below max_t=3",
        ),
    ],
)
def test_bad_sweep_configs_fail_with_the_cause(tmp_path, fields, message):
    with pytest.raises(ConfigError) as err:
        sweep_from(tmp_path, **fields)
    assert message in str(err.value)


def test_set_overrides_reach_the_sweep_and_its_overrides(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "base": TINY_BASE, "search": {"train.lr": {"grid": [1e-3]}}})
    )
    sweep = load_sweep_config(path, ["num_samples=4", "overrides.train.max_steps=3", "algorithm=random"])
    assert (sweep.num_samples, sweep.algorithm, sweep.overrides) == (4, "random", {"train.max_steps": 3})
    assert sweep.base == TINY_BASE  # resolved against the sweep file's folder


# -- upfront validation ----------------------------------------------------------------------


def test_a_bad_value_fails_the_whole_sweep_naming_the_trial(tmp_path):
    # 9 tokens need a 3x3 grid, which does not tile the tiny tower's 4x4 token grid; 5 is not square.
    sweep = sweep_from(tmp_path, search={"model.tokens.tokens.medium": {"grid": [4, 9, 5]}})
    with pytest.raises(ConfigError) as err:
        validate_sweep(sweep, load_base(sweep))
    text = str(err.value)
    assert "2 of 3 trial configs are invalid" in text
    assert "{'model.tokens.tokens.medium': 9}" in text and "does not divide" in text
    assert "{'model.tokens.tokens.medium': 5}" in text and "square" in text
    assert "{'model.tokens.tokens.medium': 4}" not in text


def test_a_bad_learning_rate_bound_is_caught_before_launch(tmp_path):
    sweep = sweep_from(tmp_path, algorithm="random", search={"train.lr": {"uniform": [-1.0, 1e-3]}})
    with pytest.raises(ConfigError, match=r"\{'train.lr': -1.0\}(.|\n)*train.lr"):
        validate_sweep(sweep, load_base(sweep))


def test_trial_config_lives_in_the_sweep_folder_with_typed_overrides(tmp_path):
    sweep = sweep_from(
        tmp_path,
        overrides={"train.max_steps": 3},
        search={"train.lr": {"grid": [1e-5]}},
        storage_path=str(tmp_path),
    )
    base = load_base(sweep)
    cfg = resolve_trial_config(
        base, sweep, {"train.lr": 1e-5, "model.zoom.levels": ["low", "high"]}, trial_name="abc_00001"
    )
    assert cfg.run.name == "abc_00001"
    assert cfg.run_dir() == f"{tmp_path}/sweeps/t/trials/abc_00001"
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)  # "1e-05" would be a string to YAML
    assert cfg.train.max_steps == 3
    assert cfg.dragonfly_config().zoom.levels == ("low", "high")


# -- resources -------------------------------------------------------------------------------


def test_max_concurrent_trials_from_cluster_resources(tmp_path):
    sweep = sweep_from(
        tmp_path,
        overrides={"run.num_workers": 2, "run.cpus_per_worker": 1.0},
        search={"train.lr": {"grid": [1e-3]}},
    )
    configs = validate_sweep(sweep, load_base(sweep))
    # Per trial: 0.01 driver + 2 workers = 2.01 CPU; 1 CPU kept for a crop task.
    assert derive_max_concurrent_trials({"CPU": 16.0}, configs) == 7
    assert derive_max_concurrent_trials({"CPU": 5.1}, configs) == 2
    assert derive_max_concurrent_trials({"CPU": 3.1}, configs) == 1
    with pytest.raises(ConfigError, match="needs 2.01 CPU"):
        derive_max_concurrent_trials({"CPU": 3.0}, configs)


def test_gpus_bound_concurrency_on_gpu_clusters(tmp_path):
    sweep = sweep_from(
        tmp_path,
        overrides={
            "run.use_gpu": True,
            "run.num_workers": 4,
            "run.cpus_per_worker": 1.0,
            "mlflow.tracking_uri": "http://x",
        },
        search={"train.lr": {"grid": [1e-3]}},
    )
    configs = validate_sweep(sweep, load_base(sweep))
    assert derive_max_concurrent_trials({"CPU": 128.0, "GPU": 8.0}, configs) == 2
    with pytest.raises(ConfigError, match="needs 4 GPU"):
        derive_max_concurrent_trials({"CPU": 128.0, "GPU": 2.0}, configs)


# -- results ---------------------------------------------------------------------------------


def test_pareto_front_max_and_min():
    costs = [100, 200, 300, 300, 400]
    values = [0.5, 0.7, 0.6, 0.7, 0.9]
    # 300/0.6 is beaten by 200/0.7; 300/0.7 ties on value at a higher cost than 200/0.7.
    assert pareto_front(costs, values, "max") == [True, True, False, False, True]
    losses = [2.0, 1.5, 1.5, math.nan, 1.0]
    assert pareto_front(costs, losses, "min") == [True, True, False, False, True]
    # Equal points do not dominate each other.
    assert pareto_front([1, 1], [0.5, 0.5], "max") == [True, True]


def test_results_files_agree_with_the_rows(tmp_path):
    keys = ["model.zoom.levels", "model.tokens.tokens.medium"]
    rows = [
        {"trial_id": "a", "model.zoom.levels": ["low", "medium"], "model.tokens.tokens.medium": 36,
         IMAGE_TOKENS: 720, TFLOPS: 9.9, "val_exact_match": 0.40},
        {"trial_id": "b", "model.zoom.levels": ["low", "medium"], "model.tokens.tokens.medium": 144,
         IMAGE_TOKENS: 1152, TFLOPS: 16.2, "val_exact_match": 0.45},
        {"trial_id": "c", "model.zoom.levels": ["low", "medium"], "model.tokens.tokens.medium": 576,
         IMAGE_TOKENS: 2880, TFLOPS: 40.3, "val_exact_match": 0.42},
        {"trial_id": "d", "model.zoom.levels": ["low", "medium"], "model.tokens.tokens.medium": 16,
         IMAGE_TOKENS: 640, TFLOPS: 8.8, "val_exact_match": None},
    ]  # fmt: skip
    paths = write_results(rows, keys, "val_exact_match", "max", tmp_path / "out")

    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table] == ["a", "b", "c", "d"]
    assert [r["pareto_tokens"] for r in table] == ["True", "True", "False", "False"]
    assert [r["val_exact_match"] for r in table] == ["0.4", "0.45", "0.42", ""]
    assert json.loads(table[0]["model.zoom.levels"]) == ["low", "medium"]

    saved = json.loads(paths["json"].read_text())
    assert (saved["metric"], saved["mode"]) == ("val_exact_match", "max")
    assert [t["pareto_tflops"] for t in saved["trials"]] == [True, True, False, False]
    assert [t[IMAGE_TOKENS] for t in saved["trials"]] == [720, 1152, 2880, 640]

    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size[0] > 1000 and png.size[1] > 400
        # Not a blank canvas: the scatter, the red front and the labels are drawn.
        assert len(set(png.convert("RGB").getdata())) > 50


def test_a_trial_that_failed_before_reporting_has_its_row_and_cost(tmp_path):
    """A trial that raised before its first report (say, its MLflow run could not be created on any
    attempt) has no metrics, only Tune's error; it still gets a row, its image cost from its
    config, so the results files list every trial. Such trials used to be left out. A trial that
    reported keeps the cost it reported (a resumed sweep's base recipe may have changed since); one
    whose config cannot be built has no cost, and the results are still written."""
    from types import SimpleNamespace

    from dragonfly_platform.tune import COMPLETE, TRIAL_ERROR, result_rows

    sweep = sweep_from(tmp_path, search={"model.tokens.tokens.high": {"grid": [16, 36]}})
    base = load_base(sweep)

    def trial(high, metrics, error, folder):
        grid = {GRID_KEY: {"model.tokens.tokens.high": high}}
        return SimpleNamespace(
            config=grid, metrics=metrics, error=error, path=str(tmp_path / folder), metrics_dataframe=None
        )

    finished = trial(
        16,
        {
            "trial_id": "1a2b3_00000",
            COMPLETE: 1,
            "val_loss": 1.5,
            IMAGE_TOKENS: 100,
            TFLOPS: 4.5,
            "mlflow_run_id": "r1",
        },
        None,
        "run_trial_1a2b3_00000_0_high=16_2026-11-30_05-00-00",
    )
    failed = trial(
        36,
        {},
        RuntimeError("tracking server unreachable"),
        "run_trial_1a2b3_00001_1_high=36_2026-11-30_05-00-01",
    )
    broken = trial(
        23.7, None, ValueError("not an integer"), "run_trial_1a2b3_00002_2_high=23.7_2026-11-30_05-00-02"
    )
    rows = result_rows([broken, failed, finished], sweep, base)

    assert [r["trial_id"] for r in rows] == ["1a2b3_00000", "1a2b3_00001", "1a2b3_00002"]
    by_config = image_budget(resolve_trial_config(base, sweep, {"model.tokens.tokens.high": 36}))
    assert [(r[IMAGE_TOKENS], r[TFLOPS]) for r in rows] == [
        (100, 4.5),
        (by_config[IMAGE_TOKENS], by_config[TFLOPS]),
        (None, None),
    ]
    assert [(r["status"], r["error"]) for r in rows] == [
        ("complete", None),
        ("error", "RuntimeError: tracking server unreachable"),
        ("error", "ValueError: not an integer"),
    ]
    assert rows[1]["val_loss"] is None and rows[1]["mlflow_run_id"] is None and TRIAL_ERROR not in rows[1]

    paths = write_results(rows, ["model.tokens.tokens.high"], "val_loss", "min", tmp_path / "out")
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["trial_id"], r[IMAGE_TOKENS], r["pareto_tokens"]) for r in table] == [
        ("1a2b3_00000", "100", "True"),
        ("1a2b3_00001", str(by_config[IMAGE_TOKENS]), "False"),
        ("1a2b3_00002", "", "False"),
    ]


def test_plot_labels_name_the_searched_values():
    row = {"model.zoom.levels": ["low", "high"], "model.tokens.tokens.high": 16, "train.lr": 0.000123456}
    keys = ["model.zoom.levels", "model.tokens.tokens.medium", "model.tokens.tokens.high", "train.lr"]
    assert trial_label(row, keys) == "levels=L+H high=16 lr=0.000123"


def test_sweep_params_show_no_secret_of_the_overrides(tmp_path):
    from dragonfly_platform.tune import sweep_params

    sweep = sweep_from(
        tmp_path,
        search={"train.lr": {"grid": [1e-3]}},
        overrides={
            "mlflow.tracking_uri": "postgresql://bob:planted-pw@db:5432/mlflow",
            "data.storage.secret_key": "planted-key",
            "train.max_steps": 3,
        },
    )
    shown = json.loads(sweep_params(sweep)["sweep.overrides"])
    assert shown == {"mlflow.tracking_uri": "postgresql://bob:***@db:5432/mlflow", "train.max_steps": "3"}


@pytest.mark.parametrize(
    ("grace", "max_t", "rungs"),
    [(1, 8, [4, 2, 1]), (3, 12, [6, 3]), (3, 10, [6, 3]), (1, 3, [2, 1])],
)
def test_asha_rungs_lie_before_a_trials_last_validation(tmp_path, grace, max_t, rungs):
    """1/8/2 and 3/12/2 are where Ray on its own would put a rung at max_t, the round a full trial
    ends its training on, and cut trials there before their export and exact-match report."""
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    from dragonfly_platform.tune import VALIDATION_ROUND, _scheduler

    sweep = sweep_from(
        tmp_path,
        search={"train.lr": {"grid": [1e-3]}},
        scheduler={"type": "asha", "grace_period": grace, "max_t": max_t, "reduction_factor": 2},
    )
    scheduler = _scheduler(sweep)
    scheduler.set_search_properties(metric="val_loss", mode="min")
    assert [milestone for milestone, _ in scheduler._brackets[0]._rungs] == rungs

    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    better, worse = Trial("better"), Trial("worse")
    for trial in (better, worse):
        scheduler.on_trial_add(None, trial)
    actions = []
    for round_ in range(1, max_t + 1):  # alike until the last round, where one is worse
        for trial, last_loss in ((better, 0.5), (worse, 0.9)):
            loss = last_loss if round_ == max_t else 1.0
            actions.append(
                scheduler.on_trial_result(None, trial, {VALIDATION_ROUND: round_, "val_loss": loss})
            )
    assert set(actions) == {TrialScheduler.CONTINUE}  # the worse one still finishes and reports


def test_validation_rounds_follow_the_training_step_across_a_resume(monkeypatch):
    """Validations at steps 3, 6 and the last step 8 (every 3) are rounds 1, 2, 3; a trial resumed
    from its step-3 checkpoint (a new driver, a new callback) reports step 6 as round 2, not 1."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from dragonfly_platform.tune import VALIDATION_ROUND, _report_callback

    forwarded = []
    monkeypatch.setattr(TuneReportCallback, "__init__", lambda self: None)  # needs a Tune session
    monkeypatch.setattr(
        TuneReportCallback,
        "after_report",
        lambda self, run_context, metrics, checkpoint: forwarded.append(metrics[0]),
    )

    def report(callback, step, **metrics):
        callback.after_report(None, [{"step": step, **metrics}, {"step": step}], None)

    first = _report_callback("val_loss", {"image_tokens": 784}, checkpoint_every=3)
    report(first, 1, loss=2.0)  # a step without validation is not forwarded
    report(first, 3, val_loss=1.5)
    resumed = _report_callback("val_loss", {"image_tokens": 784}, checkpoint_every=3)
    for step in (6, 8):
        report(resumed, step, val_loss=1.0)
    assert [(m["step"], m[VALIDATION_ROUND], m["image_tokens"]) for m in forwarded] == [
        (3, 1, 784),
        (6, 2, 784),
        (8, 3, 784),
    ]


def test_a_trial_error_report_passes_optuna_and_asha(tmp_path):
    """The last report of a trial that failed for good goes through Tune's searcher and scheduler
    like any result: Optuna keeps no value for it and goes on, ASHA leaves it alone (no validation
    round).
    With the metric None, Optuna's Trial.report raised and took the whole sweep down."""
    from optuna.trial import TrialState
    from ray import tune
    from ray.tune.schedulers.trial_scheduler import TrialScheduler
    from ray.tune.search.optuna import OptunaSearch

    from dragonfly_platform.tune import TRIAL_ERROR, VALIDATION_ROUND, _scheduler, error_report

    report = error_report(ConfigError("too few rows"), "val_loss", {"image_tokens": 32}, "run-1")
    assert report[TRIAL_ERROR] == "ConfigError: too few rows" and math.isnan(report["val_loss"])
    result = {**report, "training_iteration": 1}
    assert VALIDATION_ROUND not in result

    searcher = OptunaSearch(space={"lr": tune.loguniform(1e-5, 1e-2)}, metric="val_loss", mode="min", seed=0)
    assert searcher.suggest("t1") is not None
    searcher.on_trial_result("t1", result)
    searcher.on_trial_complete("t1", result)  # Optuna refuses NaN as a value; Tune logs it
    assert TrialState.COMPLETE not in [t.state for t in searcher._ot_study.trials]
    assert searcher.suggest("t2") is not None  # and the search goes on

    sweep = sweep_from(
        tmp_path,
        search={"train.lr": {"grid": [1e-3]}},
        scheduler={"type": "asha", "grace_period": 1, "max_t": 3, "reduction_factor": 2},
    )
    scheduler = _scheduler(sweep)
    scheduler.set_search_properties(metric="val_loss", mode="min")

    class Trial:
        trial_id = "t1"

    scheduler.on_trial_add(None, Trial())
    assert scheduler.on_trial_result(None, Trial(), result) == TrialScheduler.CONTINUE
    scheduler.on_trial_complete(None, Trial(), result)
