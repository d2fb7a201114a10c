"""Distributed training: Ray Train's ``TorchTrainer`` running a DeepSpeed ZeRO engine in each worker.

Driver side (``run_training``): resolve the MLflow run, write the processor into the run folder, build
the trainer (``build_trainer``) and fit. Worker side (``train_loop_per_worker``): build the model, wrap
it with ``deepspeed.initialize``, restore the latest checkpoint if Ray hands one over, then loop:

    fetch `accumulation` micro-batches -> all ranks agree that each has them (else the epoch ends)
    -> forward/backward/step per micro-batch -> count steps, samples, tokens -> log (rank 0)
    -> every `checkpoint_every` steps: every rank saves its DeepSpeed shard + its data position,
       `ray.train.report(metrics, checkpoint)` merges them into one checkpoint folder

and at the end exports consolidated weights with ``DragonflyModel.save_pretrained`` (plus the
processor) to ``<storage>/<run>/export``. CPU and GPU run this same code; only the config differs
(gloo + ``DS_ACCELERATOR=cpu`` + fp32 vs NCCL + bf16).

Resume is exact: a checkpoint stores each rank's data position (the ``local_index`` of its next row in
the deterministic per-rank partition), so the restarted run sees every remaining sample of the epoch
once. Rerunning a job with the same run name and storage path makes Ray Train restore the run's
checkpoint state, so the same code path resumes after a worker crash or a killed job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dragonfly_platform.config import ConfigError, RunConfig
from dragonfly_platform.storage import StorageConfig, fetched_dir, is_s3, strip_scheme

log = logging.getLogger("dragonfly.train")

DEEPSPEED_TAG = "deepspeed"
TRAIN_STATE_FILE = "train_state_rank{rank}.json"
# DeepSpeed compiles its CPU comm op on first use (~40 s); a stable folder caches it across runs.
DEFAULT_TORCH_EXTENSIONS_DIR = os.path.expanduser("~/.cache/dragonfly/torch_extensions")


# ---------------------------------------------------------------------------------------------
# Storage helpers: the run folder is a local directory or an s3:// prefix.


def run_storage(cfg: RunConfig) -> StorageConfig:
    """The credentials/endpoint used for the run folder: the data section's."""
    return cfg.data.storage


def publish_dir(local_dir: str, url: str, storage: StorageConfig) -> None:
    """Copy a local folder to ``url`` (local folder or s3:// prefix), replacing what is there."""
    if is_s3(url):
        import pyarrow.fs

        pyarrow.fs.copy_files(
            local_dir, strip_scheme(url), destination_filesystem=storage.pyarrow_filesystem(url)
        )
    else:
        shutil.copytree(local_dir, url, dirs_exist_ok=True)


# ---------------------------------------------------------------------------------------------
# Driver side.


@dataclass
class PreparedRun:
    """What the driver hands to every worker (pickled by Ray, never logged). The config travels as
    the validated object: a JSON dump would turn its ``SecretStr`` credentials into ``**********``."""

    run_config: RunConfig
    mlflow_run_id: str
    processor_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_processor(cfg: RunConfig, init_dir: str | None):
    """The processor for this run: the init export's (with our max length), or built from the
    ``processor`` section and the model's zoom/token settings."""
    from dragonfly.processor import DragonflyProcessor

    settings = {
        "max_length": cfg.processor.max_length,
        "train_on_user_turns": cfg.processor.train_on_user_turns,
    }
    if cfg.processor.chat_template is not None:  # else an init export keeps the template it was trained with
        settings["chat_template"] = cfg.processor.chat_template
    if init_dir is not None and cfg.processor.tokenizer is None:
        return DragonflyProcessor.from_pretrained(init_dir, **settings)
    # The zoom and token settings are the model's; preset defaults hold before the tokenizer exists.
    model_cfg = cfg.dragonfly_config() if cfg.model is not None else _export_model_config(init_dir)
    return DragonflyProcessor(
        _tokenizer(cfg.processor.tokenizer), model_cfg.zoom, model_cfg.tokens, **settings
    )


def _tokenizer(name: str):
    if name == "tiny":
        from dragonfly.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def _export_model_config(init_dir: str):
    from dragonfly.model import DragonflyConfig

    with open(os.path.join(init_dir, "config.json")) as f:
        return DragonflyConfig.from_dict(json.load(f))


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Driver-side setup before any worker starts: the MLflow run (found or created) and the processor
    written into ``<run>/processor`` where every worker (and the data pipeline) reads it."""
    from dragonfly_platform.evaluate import describe_model, fetched_model
    from dragonfly_platform.tracking import resolve_mlflow_run

    cfg = cfg.with_absolute_paths()
    tracking_uri = cfg.tracking_uri()  # an S3 run without an MLflow server fails here, before any work
    storage = run_storage(cfg)
    init_from = cfg.train.init_from
    if init_from is not None and init_from.startswith("models:/"):
        # An alias moves (promotion): the processor here and the weights in every worker and retry
        # must come from one version, and the run's params must say which. A rerun of the run keeps
        # the version its first attempt pinned (and logged), wherever the alias is now.
        init_from = _pinned_by_earlier_attempt(cfg) or describe_model(init_from, tracking_uri).pinned_uri
        log.info("train.init_from %s is %s", cfg.train.init_from, init_from)
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": init_from})})
    init = fetched_model(init_from, storage, tracking_uri) if init_from else contextlib.nullcontext()
    with init as init_dir:
        processor = build_processor(cfg, init_dir)
    processor_url = f"{cfg.run_dir()}/processor"
    with tempfile.TemporaryDirectory(prefix="dragonfly-processor-") as tmp:
        processor.save_pretrained(tmp)
        publish_dir(tmp, processor_url, storage)
    run_id = resolve_mlflow_run(cfg)
    _warn_of_unoffered_preprocess_resources(cfg)
    _warn_of_actor_pools_that_cannot_all_start(cfg)
    return PreparedRun(cfg, run_id, processor_url)


def _pinned_by_earlier_attempt(cfg: RunConfig) -> str | None:
    """For ``train.init_from: models:/<name>@<alias>``: the ``models:/<name>/<version>`` an earlier
    attempt of this run pinned it to, read from its MLflow params (logged when training started)."""
    from dragonfly_platform.tracking import find_mlflow_run

    given = cfg.train.init_from.removeprefix("models:/")
    if "@" not in given:
        return None
    run = find_mlflow_run(cfg)
    logged = run.data.params.get("train.init_from") if run is not None else None
    name, _, version = (logged or "").removeprefix("models:/").rpartition("/")
    if logged and name == given.rsplit("@", 1)[0] and version.isdigit():
        log.info("rerun of %s: train.init_from stays %s, pinned by its first attempt", cfg.run.name, logged)
        return logged
    return None


def _warn_of_unoffered_preprocess_resources(cfg: RunConfig) -> None:
    """A GPU recipe sends its data tasks to nodes with the CPU group's custom resource; on a cluster
    where no node offers it (yet), they wait without an error of their own."""
    import ray

    from dragonfly_platform.data import unoffered_preprocess_resources

    missing = (
        unoffered_preprocess_resources(cfg.data, ray.cluster_resources()) if ray.is_initialized() else []
    )
    if missing:
        log.warning(
            "no node offers %s, which data.preprocess_resources asks for: the data tasks wait until "
            "the autoscaler adds such a node. On a cluster without a CPU preprocessing group, set "
            "data.preprocess_resources={} (docs/cluster.md)",
            ", ".join(missing),
        )


def actor_pool_room(cfg: RunConfig, nodes: list[dict[str, float]]) -> tuple[float, float]:
    """``(needed, available)`` CPUs for ``data.preprocess_pool: actors``: every rank's training pool
    at once, a validation task beside them (validation runs on tasks, mid-epoch, while the pools keep
    their CPUs) and, where they share nodes, the train workers; against the CPUs of the alive nodes
    the pools may use (``nodes``: each node's resources). With ``preprocess_resources`` the pools
    go to the nodes that offer them (the CPU group) and the workers elsewhere; label selectors are
    not evaluated (every node counts)."""
    from dragonfly_platform.data import actor_pool_cpus

    needed = actor_pool_cpus(cfg.data, cfg.run.num_workers)
    if cfg.data.val_manifest:
        needed += cfg.data.preprocess_num_cpus
    placement = cfg.data.preprocess_resources
    if placement:
        nodes = [n for n in nodes if all(n.get(name, 0.0) > 0 for name in placement)]
    else:
        needed += cfg.run.num_workers * cfg.run.cpus_per_worker
    return needed, sum(n.get("CPU", 0.0) for n in nodes)


def _warn_of_actor_pools_that_cannot_all_start(cfg: RunConfig) -> None:
    """Ranks whose actor pools cannot all start hang at their first collective, with no error."""
    import ray

    if not cfg.data.uses_actor_pool("train") or not ray.is_initialized():
        return
    needed, available = actor_pool_room(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    if needed > available:
        log.warning(
            "data.preprocess_pool=actors needs %g CPUs at once (%d ranks x %d actors x %g CPUs, a "
            "validation task, and the train workers where they share nodes), and the nodes the pools "
            "may use have %g: unless the autoscaler adds nodes, the ranks will wait on each other "
            "forever. Set data.preprocess_pool=tasks, or fewer or smaller actors (docs/data.md)",
            needed,
            cfg.run.num_workers,
            cfg.data.preprocess_concurrency,
            cfg.data.preprocess_num_cpus,
            available,
        )


def worker_runtime_env(cfg: RunConfig) -> dict[str, Any]:
    """Environment of the train workers: accelerator choice, extension cache, and the driver's S3
    and MLflow settings (credentials come from the nodes' environment, see ``worker_env``)."""
    from dragonfly_platform.worker_env import settings_env

    env = {
        **settings_env(),
        "MLFLOW_TRACKING_URI": cfg.tracking_uri(),
        "DS_ACCELERATOR": "cuda" if cfg.run.use_gpu else "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_TORCH_EXTENSIONS_DIR),
    }
    return {"env_vars": env}


def build_trainer(cfg: RunConfig, callbacks: list | tuple = (), prepared: PreparedRun | None = None):
    """The ``TorchTrainer`` of a run (``prepared`` defaults to ``prepare_run(cfg)``). Tune trials call
    this with their own ``callbacks`` (e.g. ``TuneReportCallback``)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dragonfly_platform.train_callbacks import CheckpointTags, StopOnPermanentError

    prepared = prepared or prepare_run(cfg)
    storage = run_storage(cfg)
    storage_path, storage_fs = ray_storage(cfg.run.storage_path, storage)
    tags = CheckpointTags(cfg.tracking_uri(), prepared.mlflow_run_id, cfg.run_dir(), storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=prepared.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[tags, *callbacks, StopOnPermanentError()],  # last: it ends the callback chain
            worker_runtime_env=worker_runtime_env(cfg),
        ),
    )


def ray_storage(url: str, storage: StorageConfig):
    """(storage_path, storage_filesystem) for Ray Train and Tune: s3 paths go without their scheme
    next to an explicit pyarrow file system built from ``storage`` (Ray rejects the two together,
    and its own S3 client knows only the environment's credentials and endpoint)."""
    if is_s3(url):
        return strip_scheme(url), storage.pyarrow_filesystem(url)
    return str(Path(url).resolve()), None


def run_training(cfg: RunConfig, callbacks: list | tuple = ()):
    """Prepare, fit and return Ray's ``Result``; the MLflow run is marked FAILED if training fails."""
    cfg = cfg.with_absolute_paths()
    prepared = prepare_run(cfg)
    return fit(build_trainer(cfg, callbacks, prepared), cfg, prepared)


def fit(trainer, cfg: RunConfig, prepared: PreparedRun):
    """``trainer.fit()``; if it fails, the run's MLflow run is marked FAILED (a worker that dies
    before its first report could not do it, and the run would show RUNNING forever). A worker's
    permanent error (``train_callbacks.PERMANENT_ERRORS``: bad records over budget, a config the
    workers reject) is raised as itself, not wrapped in Ray Train's ``ControllerError``."""
    from ray.train import ControllerError

    from dragonfly_platform.tracking import mark_failed
    from dragonfly_platform.train_callbacks import PERMANENT_ERRORS

    try:
        return trainer.fit()
    except BaseException as error:
        mark_failed(cfg, prepared.mlflow_run_id)
        if isinstance(error, ControllerError) and isinstance(error.controller_failure, PERMANENT_ERRORS):
            raise error.controller_failure from None
        raise


# ---------------------------------------------------------------------------------------------
# Worker side.


@dataclass
class TrainState:
    """Counters a checkpoint carries; ``consumed`` is this rank's data position within ``epoch``."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    samples: int = 0
    tokens: int = 0
    bad_records: int = 0  # training records skipped as bad, all ranks, all epochs
    world_size: int = 1

    @classmethod
    def load(cls, checkpoint_dir: str, rank: int) -> TrainState:
        with open(os.path.join(checkpoint_dir, TRAIN_STATE_FILE.format(rank=rank))) as f:
            return cls(**json.load(f))

    def save(self, checkpoint_dir: str, rank: int) -> None:
        with open(os.path.join(checkpoint_dir, TRAIN_STATE_FILE.format(rank=rank)), "w") as f:
            json.dump(asdict(self), f)


class Worker:
    """One rank's training: model + DeepSpeed engine + data + checkpoints. ``train_loop_per_worker``
    is ``Worker(config).run()``."""

    def __init__(self, prepared: dict[str, Any]):
        import ray.train
        import torch

        self.cfg: RunConfig = prepared["run_config"]
        self.run_id = prepared["mlflow_run_id"]
        self.processor_url = prepared["processor_dir"]
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.storage = run_storage(self.cfg)
        self.device = ray.train.torch.get_device()
        self.accumulation = self.cfg.gradient_accumulation_steps(self.world_size)
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        self._write_pid_file()

    # -- setup ---------------------------------------------------------------------------------

    def _write_pid_file(self) -> None:
        # Operators (and the fault-injection tests) find a rank's process here: py-spy, kill -9.
        if not self.cfg.run.on_s3:
            folder = Path(self.cfg.run_dir()) / "workers"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank{self.rank}.pid").write_text(str(os.getpid()))

    def _build_model(self):
        from dragonfly.model import DragonflyModel, apply_freeze_plan
        from dragonfly_platform.evaluate import fetched_model

        if self.cfg.train.init_from:
            with fetched_model(self.cfg.train.init_from, self.storage, self.cfg.tracking_uri()) as init_dir:
                model = DragonflyModel.from_pretrained(init_dir)
        else:
            model = DragonflyModel(self.cfg.dragonfly_config(self.processor))
        apply_freeze_plan(model, self.cfg.train.freeze)
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            from dragonfly_platform.config import zero3_model_problems

            problems = zero3_model_problems(model.config, self.cfg.train.micro_batch_size)
            if problems:  # a model from init_from is only known here
                raise ConfigError("; ".join(problems))

            # ZeRO-3 gathers a module's own parameters when its forward() runs; the tower calls the
            # ViT's forward_intermediates(), which reads the ViT's own parameters (class and
            # position embeddings) outside forward(). Registering them with the tower, whose
            # forward() does run, gathers them for its forward and backward.
            for param in model.vision.visual.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(model.vision, param)
        return model

    def _rows_per_rank(self, split: str, epoch: int, start: int):
        from dragonfly_platform.data import build_rank_dataset

        return build_rank_dataset(
            self.cfg.data,
            self.processor,
            split,
            rank=self.rank,
            world_size=self.world_size,
            epoch=epoch,
            start=start,
            processor_key=self.processor_url,  # the same processor on every rank, epoch and split
        )

    def _batches(self, dataset, split: str):
        from dragonfly_platform.data import BadRecordLog, iter_train_batches

        bad_log = BadRecordLog.for_rank(
            self.cfg.data,
            self.bad_records_dir,
            split,
            self.rank,
            self.state.epoch,
            fresh=split == "val",
            published_dir=self.bad_records_url,
        )
        self.bad_logs[split] = bad_log
        if split == "train":  # the run's count so far; this log adds what the rest of the epoch skips
            self.bad_records_before_log = self.state.bad_records
        return iter(
            iter_train_batches(
                dataset,
                self.cfg.train.micro_batch_size,
                self.processor.pad_token_id,
                bad_log,
                zoom=self.processor.zoom,
                prefetch_batches=self.cfg.data.prefetch_batches,
            )
        )

    def setup(self, stack: contextlib.ExitStack) -> None:
        """Everything before the first step; ``stack`` holds a resumed checkpoint's local folder."""
        import deepspeed
        import ray.train

        from dragonfly.model import param_groups
        from dragonfly.processor import DragonflyProcessor
        from dragonfly_platform.deepspeed_config import (
            build_deepspeed_config,
            build_optimizer,
            build_scheduler,
        )
        from dragonfly_platform.tracking import RankZeroTracker

        with fetched_dir(self.processor_url, self.storage) as processor_dir:
            self.processor = DragonflyProcessor.from_pretrained(processor_dir)
        checkpoint = ray.train.get_checkpoint()
        folder = stack.enter_context(checkpoint.as_directory()) if checkpoint is not None else None
        self.state = self._resume_position(folder) if folder else TrainState(world_size=self.world_size)
        self._open_bad_records(resumed=folder is not None)
        # The step the newest checkpoint holds: a run resumed at its last step must not write
        # checkpoint_step_N again (Ray deletes old checkpoints by folder, and would delete both).
        self.checkpointed_step = self.state.step if folder else None
        _, rows = self._rows_per_rank("train", epoch=0, start=0)
        # Every rank steps together, so an epoch lasts as long as the smallest partition allows.
        fewest_rows = int(self._all_reduce([rows], op="min")[0])
        samples_per_step = self.cfg.train.micro_batch_size * self.accumulation
        self.steps_per_epoch = fewest_rows // samples_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"rank partitions of {fewest_rows} rows cannot fill one optimizer step of "
                f"{samples_per_step} samples per rank (global batch {self.cfg.train.global_batch_size})"
            )
        self.total_steps = self.steps_per_epoch * self.cfg.train.epochs
        if self.cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, self.cfg.train.max_steps)
        # The data position is known: the first epoch's pipeline warms up (tasks scheduled, workers
        # started, first blocks cropped) while the model and the engine are built. A finished run
        # resumed at its end has nothing to train: no pipeline.
        self._next_batches = None if self._finished() else _started(self._epoch_batches())
        model = self._build_model()
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = build_optimizer(param_groups(model, self.cfg.train.weight_decay), self.cfg)
        scheduler = build_scheduler(optimizer, self.total_steps, self.cfg.train)

        if not self.cfg.run.use_gpu:
            # DeepSpeed would JIT-compile its shared-memory all-reduce kernel here (minutes on a busy
            # 2-core machine, and again whenever processes with other compiler flags share the
            # cache); gloo's all-reduce does the same job for training on CPU.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=build_deepspeed_config(self.cfg, self.world_size),
            dist_init_required=False,
        )
        self.tracker = RankZeroTracker(self.cfg, self.run_id, self.rank)
        if folder:
            self.engine.load_checkpoint(folder, tag=DEEPSPEED_TAG)
            self._log(
                f"resumed from step {self.state.step} (epoch {self.state.epoch}, position {self.state.consumed})"
            )
        self.tracker.log_params(self.cfg.flatten())
        self.tracker.set_tags({"trainable_params": self.trainable, "world_size": self.world_size})

    def _open_bad_records(self, resumed: bool) -> None:
        """This rank's bad-records files are appended in a local folder and published to
        ``<run>/bad_records`` (local or S3) at each checkpoint, at the end, and when too many records
        were bad. A resumed run fetches its train file, cuts it back to the records before its
        resume position and appends to it, so no record is listed twice."""
        from dragonfly_platform.data import bad_records_file_name, keep_records_before

        self.bad_logs: dict[str, Any] = {}
        self.val_bad_records = 0
        self.bad_records_url = f"{self.cfg.run_dir()}/bad_records"
        self.bad_records_dir = tempfile.mkdtemp(prefix="dragonfly-bad-records-")
        name = bad_records_file_name("train", self.rank)
        fs = self.storage.filesystem(self.bad_records_url)
        published = f"{strip_scheme(self.bad_records_url)}/{name}"
        if resumed and fs.exists(published):
            local = os.path.join(self.bad_records_dir, name)
            fs.get_file(published, local)
            dropped = keep_records_before(local, self.state.epoch, self.state.consumed)
            if dropped:
                self._log(f"{dropped} bad record(s) past the checkpoint will be read (and listed) again")

    def _publish_bad_records(self) -> None:
        """Copy this rank's bad-records files to ``<run>/bad_records``."""
        files = sorted(Path(self.bad_records_dir).glob("*.jsonl"))
        if not files:
            return
        fs = self.storage.filesystem(self.bad_records_url)
        target = strip_scheme(self.bad_records_url)
        fs.makedirs(target, exist_ok=True)
        for path in files:
            fs.put_file(str(path), f"{target}/{path.name}")

    def _resume_position(self, folder: str) -> TrainState:
        state = TrainState.load(folder, self.rank)
        if state.world_size != self.world_size:
            raise ConfigError(
                f"the checkpoint in {folder} was written by {state.world_size} workers, this run has "
                f"{self.world_size}: data positions are per-rank partitions, so resume with the same count"
            )
        return state

    # -- collectives ---------------------------------------------------------------------------

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
        return tensor.tolist()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        from dragonfly_platform.data import TooManyBadRecords

        with contextlib.ExitStack() as stack:
            self.setup(stack)
        self._log(
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch), {self.world_size} workers x "
            f"micro-batch {self.cfg.train.micro_batch_size} x {self.accumulation} accumulation, "
            f"ZeRO-{self.cfg.train.zero_stage}, {self.trainable:,} trainable params"
        )
        try:
            while not self._finished():
                epoch_done = self._train_epoch()
                if epoch_done:
                    self.state.epoch += 1
                    self.state.consumed = 0
            if self.state.step != self.checkpointed_step:  # the final step gets a checkpoint too
                self._checkpoint(self._validate())
        except TooManyBadRecords:
            self._publish_bad_records()  # the list is what the user needs to read next
            raise
        self._publish_bad_records()
        self._export()  # ends with a barrier: every rank's bad-records files are published by now
        if self.rank == 0 and (self.state.bad_records or self.val_bad_records):
            with fetched_dir(self.bad_records_url, self.storage) as folder:
                self.tracker.log_artifacts(folder, "bad_records")
        self.tracker.finish()
        shutil.rmtree(self.bad_records_dir, ignore_errors=True)

    def _micro_batches(self, batches):
        """Up to ``accumulation`` micro-batches and the seconds spent waiting for them."""
        started, taken = time.perf_counter(), []
        for _ in range(self.accumulation):
            batch = next(batches, None)
            if batch is None:
                break
            taken.append(batch)
        return taken, time.perf_counter() - started

    def _finished(self) -> bool:
        return self.state.step >= self.total_steps or self.state.epoch >= self.cfg.train.epochs

    def _epoch_batches(self):
        """Training batches from the current data position (``state.epoch``, ``state.consumed``)."""
        dataset, _ = self._rows_per_rank("train", self.state.epoch, self.state.consumed)
        return self._batches(dataset, "train")

    def _train_epoch(self) -> bool:
        """Train until ``total_steps`` or the end of the epoch's data; True when the data ran out."""
        batches, self._next_batches = self._next_batches or self._epoch_batches(), None
        self.engine.train()
        while self.state.step < self.total_steps:
            step_started = time.perf_counter()
            micro, data_wait = self._micro_batches(batches)
            full = len(micro) == self.accumulation
            samples = sum(len(b["input_ids"]) for b in micro)
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            ranks_ready, samples, tokens, bad = self._all_reduce(
                [float(full), samples, tokens, self.bad_logs["train"].bad]
            )
            self.state.bad_records = self.bad_records_before_log + int(bad)
            if ranks_ready < self.world_size:
                return True  # some rank is out of data: nobody steps (a lone rank would hang)
            lr = self.engine.lr_scheduler.get_last_lr()[0]  # the rate this step uses
            loss, grad_norm = self._optimizer_step(micro)
            self.state.step += 1
            self.state.samples += int(samples)
            self.state.tokens += int(tokens)
            self.state.consumed = int(micro[-1]["local_index"].max()) + 1
            step_time = time.perf_counter() - step_started
            if self.state.step % self.cfg.train.log_every == 0 or self.state.step == 1:
                self._log_step(loss, lr, grad_norm, samples, tokens, step_time, data_wait)
            if self.state.step % self.cfg.train.checkpoint_every == 0:
                self._checkpoint(self._validate())
        return False

    def _to_device(self, batch: dict) -> dict:
        keys = ("input_ids", "attention_mask", "labels", "pixels", "has_image")
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys if k in batch}

    def _optimizer_step(self, micro: list[dict]) -> tuple[float, float | None]:
        """Forward/backward over the micro-batches (DeepSpeed steps the optimizer on the last one).
        Returns the mean loss over micro-batches and ranks, and the pre-clipping gradient norm."""
        import torch

        losses, grad_norm = [], None
        for index, batch in enumerate(micro):
            loss = self.engine(**self._to_device(batch)).loss
            self.engine.backward(loss)
            if index == len(micro) - 1 and self.cfg.train.zero_stage == 0:
                # ZeRO stages 1-3 report the norm they clip with; stage 0 in fp32 does not.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            self.engine.step()
            losses.append(loss.detach().float().item())
        if grad_norm is None:
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        mean_loss = self._all_reduce([sum(losses) / len(losses)])[0] / self.world_size
        return mean_loss, grad_norm

    def _log_step(self, loss, lr, grad_norm, samples, tokens, step_time, data_wait) -> None:
        metrics = {
            "loss": loss,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "samples_per_s": samples / step_time,
            "tokens_per_s": tokens / step_time,
            "data_wait_share": data_wait / step_time,
            "epoch": self.state.epoch,
            "samples": self.state.samples,
            "tokens": self.state.tokens,
            "bad_records": self.state.bad_records,
        }
        self.tracker.log_metrics(metrics, step=self.state.step)
        norm = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        self._log(
            f"step {self.state.step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {norm} "
            f"{samples / step_time:.1f} samples/s data_wait {100 * data_wait / step_time:.0f}%"
        )

    # -- validation ----------------------------------------------------------------------------

    def _validate(self) -> dict[str, float]:
        """Mean loss over up to ``eval_batches`` validation micro-batches per rank (all ranks run the
        same number: ZeRO-3's forward gathers parameters collectively)."""
        import torch

        if not self.cfg.train.eval_batches or not self.cfg.data.val_manifest:
            return {}
        dataset, _ = self._rows_per_rank("val", epoch=0, start=0)
        batches = self._batches(dataset, "val")
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for _ in range(self.cfg.train.eval_batches):
                batch = next(batches, None)
                ready = self._all_reduce([float(batch is not None)])[0]
                if ready < self.world_size:
                    break
                total += self.engine(**self._to_device(batch)).loss.float().item()
                count += 1
        self.engine.train()
        total, count, bad = self._all_reduce([total, count, self.bad_logs["val"].bad])
        if not count:
            return {}
        self.val_bad_records = int(bad)
        metrics = {"val_loss": total / count, "val_bad_records": self.val_bad_records}
        self.tracker.log_metrics(metrics, step=self.state.step)
        self._log(f"step {self.state.step} val_loss {metrics['val_loss']:.4f}")
        return metrics

    # -- checkpoints and export ----------------------------------------------------------------

    def _checkpoint(self, extra_metrics: dict[str, float]) -> None:
        """Every rank writes its DeepSpeed shard and data position into a local folder; Ray merges
        the folders of all ranks into ``<run>/checkpoint_step_NNNNNNN`` and registers the checkpoint
        only once every upload finished (a failed upload is never resumed from)."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        from dragonfly_platform.train_callbacks import checkpoint_folder_name

        self._publish_bad_records()
        folder = tempfile.mkdtemp(prefix=f"dragonfly-ckpt-{self.state.step}-")
        self.engine.save_checkpoint(folder, tag=DEEPSPEED_TAG)
        self.state.save(folder, self.rank)
        name = checkpoint_folder_name(self.state.step)
        mode = (
            CheckpointUploadMode.ASYNC
            if self.cfg.resolved_checkpoint_upload() == "async"
            else CheckpointUploadMode.SYNC
        )
        metrics = {**asdict(self.state), "mlflow_run_id": self.run_id, **extra_metrics}
        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
        )
        self.checkpointed_step = self.state.step
        self._log(f"checkpoint {self.cfg.run_dir()}/{name}")  # tagged in MLflow once uploaded

    def _export(self) -> None:
        """Consolidated weights in ``save_pretrained`` format plus the processor, to ``<run>/export``
        and to the MLflow run's ``model/`` artifacts. Under ZeRO-3 every rank takes part in gathering
        the shards; rank 0 writes."""
        import deepspeed
        import torch.distributed as dist

        module = self.engine.module
        gather = (
            deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
            if self.cfg.train.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if self.rank == 0:
                with tempfile.TemporaryDirectory(prefix="dragonfly-export-") as local, _host_copies(module):
                    module.save_pretrained(local)
                    self.processor.save_pretrained(local)
                    publish_dir(local, self.cfg.export_dir(), self.storage)
                    self.tracker.log_artifacts(local, "model")
        dist.barrier()
        self.tracker.set_tags({"export": self.cfg.export_dir()})
        self._log(f"exported {self.cfg.export_dir()}")

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[{self.cfg.run.name}] {message}", flush=True)


def _started(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches`` with its first item already being fetched on a background thread, so a Ray Data
    pipeline starts running now rather than at the first ``next()``. Errors surface at that ``next()``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-batch")
    first = pool.submit(next, batches, None)
    pool.shutdown(wait=False)

    def chained() -> Iterator[dict]:
        item = first.result()
        if item is not None:
            yield item
            yield from batches

    return chained()


@contextlib.contextmanager
def _host_copies(module):
    """Point every parameter at its own host-memory copy for the duration (then restore).

    ZeRO 1-2 keep trainable parameters as views into one flat buffer, which safetensors refuses to
    save (shared storage); own copies on the host also keep an export from doubling device memory."""
    originals = {}
    for param in module.parameters():
        originals[param] = param.data
        param.data = param.data.to("cpu", copy=True)
    try:
        yield
    finally:
        for param, data in originals.items():
            param.data = data


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point; ``config`` is ``PreparedRun.to_dict()``."""
    Worker(config).run()


__all__ = [
    "build_trainer",
    "train_loop_per_worker",
    "run_training",
    "prepare_run",
    "PreparedRun",
    "TrainState",
    "publish_dir",
    "ray_storage",
    "fit",
]
