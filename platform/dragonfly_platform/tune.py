"""Ray Tune sweeps: one Ray Train run per trial, the MLflow parent run and its children, the results.

Each trial is a small driver function (the Train V2 pattern: ``Tuner(trainer)`` is gone) that
builds a ``TorchTrainer`` for its resolved run config and forwards the trainer's validation reports
to Tune, where ASHA can stop it. The sweep driver owns the MLflow parent run; each trial's training
run is its child. At the end the parent run gets the results table and plot (``sweep_results``).
The sweep recipe, its search space and the upfront validation of every trial are in
``sweep_config``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from dragonfly.config import ConfigError
from dragonfly_platform.config import RunConfig, redact_params
from dragonfly_platform.storage import is_s3
from dragonfly_platform.sweep_config import (
    DRIVER_CPUS,
    IMAGE_TOKENS,
    TFLOPS,
    SweepConfig,
    build_param_space,
    derive_max_concurrent_trials,
    image_budget,
    load_base,
    resolve_trial_config,
    searched_keys,
    sweep_storage_dir,
    trial_overrides,
    validate_sweep,
)
from dragonfly_platform.sweep_results import number_or_nan, write_results
from dragonfly_platform.train import publish_dir, ray_storage, run_storage

EXACT_MATCH = "val_exact_match"
# Numbers a trial's validation reports: ASHA's clock.
VALIDATION_ROUND = "validation_round"
# Set by a trial's last report, after its training finished (ASHA-stopped trials never send it).
COMPLETE = "trial_complete"
# Set by the report of a trial that failed in a way no retry can fix; the text of the error.
TRIAL_ERROR = "trial_error"
# MLflow tags: the parent run is found again by the sweep folder when a sweep resumes.
SWEEP_DIR_TAG = "dragonfly.sweep_dir"
ROLE_TAG = "dragonfly.sweep_role"


# -- exact match on the validation split ------------------------------------------------------


def exact_match_on_val(cfg: RunConfig, max_samples: int) -> dict[str, float]:
    """Greedy answers of the trial's export on the first ``max_samples`` validation records, scored
    by exact match (the evaluation job's Ray Data batch inference, one replica on the CPUs the
    trial's workers just released)."""
    from dragonfly_platform.evaluate import EvalConfig, evaluate_model

    eval_cfg = EvalConfig(
        data=cfg.data.val_manifest,
        image_root=cfg.data.image_root,
        storage=cfg.data.storage,
        task="exact",
        limit=max_samples,
        replicas=1,
        num_cpus=cfg.run.num_workers * cfg.run.cpus_per_worker,
        num_gpus=1 if cfg.run.use_gpu else 0,
    )
    metrics = evaluate_model(
        cfg.export_dir(), eval_cfg, tracking_uri=cfg.tracking_uri(), log_to="none"
    ).metrics
    return {
        EXACT_MATCH: metrics["exact_match"],
        "val_exact_match_samples": metrics["n_samples"] - metrics["n_errors"],
    }


# -- one trial --------------------------------------------------------------------------------


def _report_callback(metric: str, extra: dict[str, float], checkpoint_every: int):
    """Ray Train -> Tune: forward rank 0's validation reports (with ``metric``) numbered by
    ``VALIDATION_ROUND``, plus ``extra``. Reports without the metric would fail Tune's strict metric
    check (and mean nothing to ASHA).

    A validation runs at every ``checkpoint_every``-th step and at the last step, so the round is
    ``ceil(step / checkpoint_every)``: derived from the training position, it stays right when a
    resumed sweep restarts the trial from its checkpoint (a counter would start again at 1 and put
    the trial's later validations on ASHA's early rungs)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValidationReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                round_ = math.ceil(metrics[0]["step"] / checkpoint_every)
                first = {**metrics[0], **extra, VALIDATION_ROUND: round_}
                super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ValidationReportCallback()


def run_trial(
    config: dict[str, Any],
    *,
    sweep: SweepConfig,
    base_raw: dict[str, Any],
    sweep_dir: str,
    parent_run_id: str,
) -> None:
    """Tune's function trainable: the driver of one trial's Ray Train run.

    The trial's training run folder is ``<sweep_dir>/trials/<trial_id>``: a retried or resumed trial
    finds its Train checkpoint and its MLflow child run there (both keyed by that folder)."""
    from ray import tune

    from dragonfly_platform.train import build_trainer, fit, prepare_run
    from dragonfly_platform.train_callbacks import PERMANENT_ERRORS

    context = tune.get_context()
    overrides = trial_overrides(config)
    cfg = resolve_trial_config(
        base_raw, sweep, overrides, trial_name=context.get_trial_id(), sweep_dir=sweep_dir
    )
    budget = image_budget(cfg)
    prepared = prepare_run(cfg)  # finds or creates the trial's MLflow run
    _adopt_child_run(cfg, prepared.mlflow_run_id, parent_run_id, context.get_trial_name(), overrides, budget)
    callback = _report_callback(sweep.metric, budget, cfg.train.checkpoint_every)
    trainer = build_trainer(cfg, callbacks=[callback], prepared=prepared)
    try:
        result = fit(trainer, cfg, prepared)
    except PERMANENT_ERRORS as err:
        # Tune retries a trial that raises, up to max_failures, and this error (a config the workers
        # reject, data over its bad-record budget) would come back on every attempt, each paying for
        # a model load. The trial ends here instead, reported with its reason; the results show it
        # as an error, and fit() has marked its MLflow run FAILED.
        tune.report(error_report(err, sweep.metric, budget, prepared.mlflow_run_id))
        return
    final = {
        **budget,
        sweep.metric: result.metrics.get(sweep.metric),
        "mlflow_run_id": prepared.mlflow_run_id,
        COMPLETE: 1,
    }
    if sweep.exact_match_samples:
        scores = exact_match_on_val(cfg, sweep.exact_match_samples)
        _client(cfg).log_batch(
            prepared.mlflow_run_id, metrics=_metric_entities(scores, result.metrics.get("step", 0))
        )
        final.update(scores)
    tune.report(final)


def error_report(err: BaseException, metric: str, budget: dict[str, float], run_id: str) -> dict[str, Any]:
    """The last report of a trial that failed in a way no retry can fix. Tune wants the sweep metric
    in every result, and searchers read it as a number (Optuna's ``Trial.report`` calls float()):
    NaN, which Optuna keeps no value for and ASHA never sees (no validation round)."""
    return {**budget, metric: math.nan, "mlflow_run_id": run_id, TRIAL_ERROR: f"{type(err).__name__}: {err}"}


def _client(cfg: RunConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri())


def _metric_entities(metrics: dict[str, float], step: int) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]


def _adopt_child_run(cfg, run_id, parent_run_id, trial_name, overrides, budget) -> None:
    """Make the trial's training run a child of the sweep's run, with the trial's point as params."""
    from mlflow.entities import Param, RunTag

    client = _client(cfg)
    logged = client.get_run(run_id).data.params
    params = {f"sweep.{key}": _param_text(value) for key, value in overrides.items()}
    params.update({IMAGE_TOKENS: str(budget[IMAGE_TOKENS]), TFLOPS: f"{budget[TFLOPS]:.4f}"})
    client.log_batch(
        run_id,
        params=[Param(k, v) for k, v in params.items() if k not in logged],
        tags=[
            RunTag("mlflow.parentRunId", parent_run_id),
            RunTag("mlflow.runName", trial_name),
            RunTag(ROLE_TAG, "trial"),
        ],
        metrics=_metric_entities(budget, 0),
    )


def _param_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


# -- the sweep --------------------------------------------------------------------------------


def _find_or_create_parent(sweep: SweepConfig, probe: RunConfig, sweep_dir: str) -> str:
    """The sweep's MLflow parent run, keyed by the sweep folder so a resumed sweep reuses it."""
    from dragonfly_platform.tracking import resolve_mlflow_run

    client = _client(probe)
    experiment = client.get_experiment_by_name(probe.mlflow.experiment)
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{sweep_dir}' and tags.`{ROLE_TAG}` = 'sweep'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    # The training helper's resolver creates the experiment with the right artifact root; the
    # parent is keyed by the sweep folder, which no training run uses.
    run_id = resolve_mlflow_run(
        _with(probe, "run", name=sweep.name, storage_path=sweep_dir.rsplit("/", 1)[0])
    )
    tags = {
        SWEEP_DIR_TAG: sweep_dir,
        ROLE_TAG: "sweep",
        "mlflow.runName": sweep.name,
        "mlflow.source.name": "jobs/sweep.py",
    }
    client.log_batch(run_id, tags=_tags(tags))
    client.log_batch(run_id, params=_params(sweep_params(sweep)))
    return run_id


def _with(cfg: RunConfig, section: str, **fields) -> RunConfig:
    """``cfg`` with some fields of one section replaced (configs are frozen)."""
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=fields)})


def _tags(tags: dict[str, str]) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _params(params: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in params.items()]


def sweep_params(sweep: SweepConfig) -> dict[str, str]:
    """The parent run's params: how the sweep searches (the space as one JSON param)."""
    import json

    space = [{key: dim.model_dump(exclude_none=True) for key, dim in s.items()} for s in sweep.search]
    params = {
        "sweep.base": Path(sweep.base).name,
        "sweep.algorithm": sweep.algorithm,
        "sweep.num_samples": str(sweep.num_samples),
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
        "sweep.search": json.dumps(space),
        "sweep.overrides": json.dumps(redact_params(sweep.overrides)),
    }
    if sweep.scheduler:
        params["sweep.scheduler"] = json.dumps(sweep.scheduler.model_dump())
    return params


def _search_alg(sweep: SweepConfig):
    if sweep.algorithm != "bayesian":
        return None  # Tune's default: grid points x samples, sampled axes drawn at random
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=sweep.metric, mode=sweep.mode, seed=sweep.seed)


def _scheduler(sweep: SweepConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler is None or sweep.scheduler.type == "fifo":
        return FIFOScheduler()
    s = sweep.scheduler
    return ASHAScheduler(
        # Rounds count validation reports only: the trial's last report (exact match, after
        # training) has none, so ASHA never cuts a trial between its training and that report.
        time_attr=VALIDATION_ROUND,
        grace_period=s.grace_period,
        # Ray puts a rung at max_t itself whenever max_t = grace * rf**k (and, by default, stops
        # every trial that reaches max_t): half a round short of the last validation, and with
        # stop_last_trials off, every rung lies before it and a trial that passes them finishes.
        max_t=s.max_t - 0.5,
        stop_last_trials=False,
        reduction_factor=s.reduction_factor,
    )


def run_sweep(sweep: SweepConfig, cluster_resources: dict[str, float] | None = None):
    """Validate every trial config, then run (or resume) the sweep and publish its results.

    Returns ``(rows, paths)``: one row per trial and the local result files. Needs ``ray.init``."""
    import ray
    from ray import tune

    base_raw = load_base(sweep)
    sweep_dir = sweep_storage_dir(sweep, base_raw)
    configs = validate_sweep(sweep, base_raw)
    # One tracking store for the whole sweep, where jobs/train.py logs the same recipe: the embedded
    # sqlite default would otherwise follow each trial's run folder.
    tracking_uri = _with(
        configs[0], "run", storage_path=sweep_dir.removesuffix(f"/sweeps/{sweep.name}")
    ).tracking_uri()
    probe = _with(configs[0], "mlflow", tracking_uri=tracking_uri)
    sweep = sweep.model_copy(update={"overrides": {**sweep.overrides, "mlflow.tracking_uri": tracking_uri}})
    cluster = cluster_resources or ray.cluster_resources()
    concurrent = (
        derive_max_concurrent_trials(cluster, configs)
        if sweep.max_concurrent_trials == "auto"
        else sweep.max_concurrent_trials
    )
    parent_run_id = _find_or_create_parent(sweep, probe, sweep_dir)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, sweep=sweep, base_raw=base_raw, sweep_dir=sweep_dir, parent_run_id=parent_run_id
        ),
        {"CPU": DRIVER_CPUS},
    )
    storage_root, name = sweep_dir.rsplit("/", 1)
    # Tune's own state through the storage settings the trials' Train runs use.
    storage_root, storage_fs = ray_storage(storage_root, run_storage(configs[0]))
    tune_dir = f"{storage_root}/{name}"
    if tune.Tuner.can_restore(tune_dir, storage_filesystem=storage_fs):
        print(f"[sweep {sweep.name}] resuming from {sweep_dir}", flush=True)
        tuner = tune.Tuner.restore(
            tune_dir,
            trainable=trainable,
            resume_errored=True,
            param_space=build_param_space(sweep),
            storage_filesystem=storage_fs,
        )
    else:
        print(
            f"[sweep {sweep.name}] {len(configs)} trial configs valid; up to {concurrent} at once", flush=True
        )
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                num_samples=sweep.num_samples,
                search_alg=_search_alg(sweep),
                scheduler=_scheduler(sweep),
                max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_root,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            ),
        )
    grid = tuner.fit()
    # After Ctrl-C Tune returns normally, with the trials it stopped shown as terminated; the state
    # it saved for a restore tells them apart (pending). Publishing now would record them as
    # stopped early and the sweep as finished.
    saved = tune.ExperimentAnalysis(tune_dir, storage_filesystem=storage_fs)
    unfinished = sum(t.status not in (t.TERMINATED, t.ERROR) for t in saved.trials)
    if unfinished:
        _client(probe).set_tag(parent_run_id, "sweep.status", "interrupted")
        raise SweepInterrupted(
            f"sweep {sweep.name} interrupted with {unfinished} unfinished trial(s); its state is saved "
            f"in {sweep_dir}: rerun the same command to continue it"
        )
    rows = result_rows(grid, sweep, base_raw)
    paths = publish_results(sweep, probe, parent_run_id, rows, sweep_dir)
    return rows, paths


class SweepInterrupted(RuntimeError):
    """Tune stopped before every trial ended (Ctrl-C); nothing was published."""


def result_rows(grid, sweep: SweepConfig, base_raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: its searched values, image cost, last metrics and how it ended. A trial
    that failed before its first report has a row too, its image cost taken from its config."""
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        error = metrics.get(TRIAL_ERROR) or (
            f"{type(result.error).__name__}: {result.error}" if result.error else None
        )
        overrides = trial_overrides(result.config)
        reported = {key: metrics[key] for key in (IMAGE_TOKENS, TFLOPS) if metrics.get(key) is not None}
        row = {
            "trial_id": metrics.get("trial_id") or _trial_id_of(result.path),
            "status": "error" if error else ("complete" if metrics.get(COMPLETE) else "stopped_early"),
            "reports": _validation_rounds(result),
            **overrides,
            **(reported or _config_budget(base_raw, sweep, overrides)),
            sweep.metric: None if error else metrics.get(sweep.metric),
            EXACT_MATCH: metrics.get(EXACT_MATCH),
            "mlflow_run_id": metrics.get("mlflow_run_id"),
            "error": error,
        }
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _config_budget(base_raw: dict[str, Any], sweep: SweepConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """The image cost of a trial that reported none; None where its config cannot be built (what
    failed the trial, e.g. a sampled value its field rejects)."""
    try:
        return image_budget(resolve_trial_config(base_raw, sweep, overrides))
    except ConfigError:
        return {IMAGE_TOKENS: None, TFLOPS: None}


def _trial_id_of(path: str) -> str:
    """Tune's trial id (``<5 hex>_<5 digits>``) from a trial folder's name, for a trial that never
    reported (reports carry the id); the folder name if it has none."""
    name = Path(path).name
    found = re.search(r"(?:^|_)([0-9a-f]{5}_\d{5})(?:_|$)", name)
    return found.group(1) if found else name


def _validation_rounds(result) -> int:
    history = result.metrics_dataframe
    if history is None or VALIDATION_ROUND not in history:
        return 0
    return int(history[VALIDATION_ROUND].max())


def publish_results(
    sweep: SweepConfig, probe: RunConfig, parent_run_id: str, rows, sweep_dir: str
) -> dict[str, Path]:
    """Results table + plot into ``<sweep_dir>/results`` (local or S3; returned paths are local) and
    onto the parent run; trials ASHA stopped are closed as KILLED (their actors died mid-run)."""
    import tempfile

    client = _client(probe)
    for row in rows:
        if row["mlflow_run_id"] and row["status"] != "complete":
            client.set_tag(row["mlflow_run_id"], "sweep.status", row["status"])
            client.set_terminated(
                row["mlflow_run_id"], status="KILLED" if row["status"] == "stopped_early" else "FAILED"
            )
    results_url = f"{sweep_dir}/results"
    out_dir = tempfile.mkdtemp(prefix="dragonfly-sweep-") if is_s3(sweep_dir) else results_url
    keys = searched_keys(sweep)
    paths = write_results(rows, keys, sweep.table_metric, sweep.table_mode, out_dir)
    if out_dir != results_url:
        publish_dir(out_dir, results_url, run_storage(probe))
    client.log_artifacts(parent_run_id, out_dir, "results")
    values = [number_or_nan(r.get(sweep.table_metric)) for r in rows]
    finite = [v for v in values if not math.isnan(v)]
    summary = {"trials": len(rows), "trials_complete": sum(r["status"] == "complete" for r in rows)}
    if finite:
        summary[f"best_{sweep.table_metric}"] = max(finite) if sweep.table_mode == "max" else min(finite)
    client.log_batch(parent_run_id, metrics=_metric_entities(summary, 0))
    client.set_tag(parent_run_id, "sweep.status", "finished")
    client.set_terminated(parent_run_id, status="FINISHED")
    return paths


__all__ = [
    "EXACT_MATCH",
    "error_report",
    "exact_match_on_val",
    "run_trial",
    "run_sweep",
    "SweepInterrupted",
    "result_rows",
    "publish_results",
    "sweep_params",
]
