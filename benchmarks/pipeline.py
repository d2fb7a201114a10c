"""Throughput and memory of the Ray Data pipeline against the crop engine alone, on the same cores.

    python benchmarks/pipeline.py [--samples 2000 --cpus 2 --resolution 336 --object-store-gib 2]

1. Writes the demo dataset and a manifest of ``--samples`` image records cycling through its images
   (text-only records left out, so both sides do the same work per sample).
2. Crop engine alone: ``--cpus`` processes (one torch thread each, imports warmed up first) read
   each file and call ``dragonfly.zoom.make_crops``; samples/s over ``--baseline-samples``, before
   each pipeline and after the last (each pipeline's reference is the mean of the two runs on
   either side of it).
3. The whole pipeline, once per ``--preprocess-pool`` (tasks, then a fixed pool of one actor per
   CPU), each on a fresh local Ray with ``--cpus`` CPUs whose Ray Data service actors are started
   first (as on any cluster that has run a dataset): manifest -> tokenize + fetch + crops ->
   ``iter_train_batches`` (collate) into a consumer that touches every batch; samples/s end to end
   and after the first batch (the pipeline's start-up excluded, as the crop engine's is), the
   object store's peak use and spilled bytes (polled from the raylet), bytes per sample.

Target (issue 4): the pipeline keeps at least 80% of the crop engine's rate and spills nothing.
Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path

import psutil

from dragonfly.config import TokenConfig, ZoomConfig
from dragonfly.processor import DragonflyProcessor
from dragonfly.tiny import build_tiny_tokenizer
from dragonfly_platform.data import BadRecordLog, DataConfig, build_dataset, iter_train_batches
from dragonfly_platform.demo_data import write_demo_dataset
from dragonfly_platform.manifest import read_manifest
from dragonfly_platform.services import LOOPBACK_ONLY_ENV, start_ray_head


def make_manifest(folder: Path, n_samples: int, seed: int) -> Path:
    write_demo_dataset(folder, n_train=70, n_val=0, seed=seed)
    images = [r for r in read_manifest(str(folder / "train.jsonl")) if r.has_image]
    path = folder / "bench.jsonl"
    with open(path, "w") as f:
        for i in range(n_samples):
            record = images[i % len(images)]
            f.write(
                json.dumps({"id": f"s{i}", "image": record.image, "conversations": record.conversations})
                + "\n"
            )
    return path


# ---------------------------------------------------------------------------------------------
# Crop engine alone


def _init_worker() -> None:
    import torch

    from dragonfly.zoom import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as the pipeline's cropping workers do


def _crop_file(args: tuple[str, ZoomConfig]) -> int:
    from dragonfly.zoom import make_crops

    path, zoom = args
    with open(path, "rb") as f:
        return make_crops(f.read(), zoom, source=path).pixels.nbytes


def crop_engine_rate(paths: list[str], zoom: ZoomConfig, cpus: int) -> dict:
    with get_context("spawn").Pool(cpus, initializer=_init_worker) as pool:
        pool.map(_crop_file, [(paths[0], zoom)] * cpus)  # warm up imports in every worker
        start = time.perf_counter()
        pool.map(_crop_file, [(p, zoom) for p in paths], chunksize=4)
        elapsed = time.perf_counter() - start
    return {"samples": len(paths), "seconds": elapsed, "samples_per_s": len(paths) / elapsed}


# ---------------------------------------------------------------------------------------------
# Pipeline


class CpuByRole:
    """CPU seconds this machine's processes spend during a phase, by role: where the pipeline's
    cores go besides cropping. Polled every ``interval_s``: a process that ends inside the phase
    (an actor pool's workers end with their dataset) counts up to its last poll."""

    def __init__(self, interval_s: float = 1.0):
        self._start = self._snapshot()
        self._last = dict(self._start)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _role(proc: psutil.Process) -> str:
        if proc.pid == os.getpid():
            return "driver (consumer, Ray Data executor)"
        cmdline = " ".join(proc.info["cmdline"] or [])
        name = proc.info["name"] or ""
        if name in ("raylet", "gcs_server"):
            return name
        if name.startswith("ray::") or "default_worker.py" in cmdline.split(" ", 2)[:2]:
            return "Ray workers (tasks, actors)"
        if "ray" in cmdline:
            return "other Ray daemons"
        return "rest of the machine"

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is not None:
                out[proc.pid] = (self._role(proc), times.user + times.system)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._last.update(self._snapshot())

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._last.update(self._snapshot())
        seconds: dict[str, float] = {}
        for pid, (role, cpu) in self._last.items():
            before = self._start.get(pid, (role, 0.0))[1]
            seconds[role] = seconds.get(role, 0.0) + max(0.0, cpu - before)
        return seconds


class StoreMonitor:
    """Polls the raylet for object-store bytes in use and bytes spilled."""

    def __init__(self, interval_s: float = 0.25):
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._reply = get_memory_info_reply
        self.interval_s = interval_s
        self.peak_used = 0
        self.spilled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        stats = self._reply(self._state).store_stats
        self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
        self.spilled = max(self.spilled, stats.spilled_bytes_total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StoreMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def pipeline_rate(manifest: Path, processor: DragonflyProcessor, pool: str, args, out_dir: str) -> dict:
    config = DataConfig(
        train_manifest=str(manifest),
        rows_per_block=args.rows_per_block,
        preprocess_num_cpus=args.preprocess_num_cpus,
        preprocess_pool=pool,
        preprocess_blocks_per_actor=args.preprocess_blocks_per_actor,
        # A fixed pool of one actor per CPU share: the rate once running, not the pool's growth.
        preprocess_concurrency=max(1, int(args.cpus / args.preprocess_num_cpus))
        if pool == "actors"
        else None,
    )
    ds, n_rows = build_dataset(config, processor, "train")
    log = BadRecordLog.for_rank(config, out_dir, "train", rank=0)
    samples = pixel_bytes = token_bytes = 0
    first_batch_at = None
    cpu = CpuByRole()
    with StoreMonitor() as monitor:
        start = time.perf_counter()
        for batch in iter_train_batches(
            ds, args.batch_size, processor.pad_token_id, log, zoom=processor.zoom
        ):
            if first_batch_at is None:
                first_batch_at = time.perf_counter()
            n = len(batch["ids"])
            samples += n
            token_bytes += int(batch["attention_mask"].sum()) * 2 * 4  # input ids + labels, int32 on the wire
            if "pixels" in batch:
                pixel_bytes += batch["pixels"].numel()
                # Touch every crop (one byte per 4 KiB): a model moves uint8 to the device as is.
                # The batch is channels-last: (B, K, R, R, 3) is its C-order view.
                int(batch["pixels"].permute(0, 1, 3, 4, 2).view(-1)[::4096].sum())
        end = time.perf_counter()
    cpu_seconds = cpu.stop()
    elapsed = end - start
    steady = (samples - args.batch_size) / (end - first_batch_at) if samples > args.batch_size else 0.0
    return {
        "samples": samples,
        "bad_records": log.bad,
        "seconds": elapsed,
        "samples_per_s": samples / elapsed,
        "steady_samples_per_s": steady,
        "first_batch_s": first_batch_at - start if first_batch_at is not None else None,
        "bytes_per_sample": (pixel_bytes + token_bytes) / max(samples, 1),
        "peak_object_store_bytes": monitor.peak_used,
        "spilled_bytes": monitor.spilled,
        "n_rows": n_rows,
        "cpu_seconds_by_role": cpu_seconds,
        "ray_data_stats": ds.stats(),
    }


def start_ray_data_services() -> None:
    """Start Ray Data's per-cluster service actors (its stats, autoscaling coordinator and usage
    actors) before the clock. They are detached: a cluster starts them for its first dataset and
    every later one (each epoch, each job) finds them running. Started inside the clock they took
    ~13 s of a 2-core run's start (four processes importing Ray Data beside the pipeline's own)."""
    import ray

    for _ in ray.data.from_items([{"x": 0}]).iter_batches():
        pass
    for actor in ray.util.list_named_actors(all_namespaces=True):
        ray.get(ray.get_actor(actor["name"], namespace=actor["namespace"]).__ray_ready__.remote())


def run_on_fresh_ray(manifest: Path, processor: DragonflyProcessor, pool: str, args, tmp: str) -> dict:
    """One pipeline run on a Ray head of its own."""
    # Every port free-chosen: concurrent Ray instances on one machine otherwise collide on fixed
    # default ports (the dashboard agent's 52365).
    head = start_ray_head(num_cpus=args.cpus, object_store_memory=int(args.object_store_gib * 1024**3))
    os.environ.update({k: v for k, v in head.env().items() if k != "RAY_ADDRESS"})
    os.environ[LOOPBACK_ONLY_ENV] = "0"  # connect on loopback, where the head listens
    import ray  # after these variables: Ray reads them at import

    try:
        ray.init(address=head.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        start_ray_data_services()
        return pipeline_rate(manifest, processor, pool, args, tmp)
    finally:
        ray.shutdown()
        head.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--baseline-samples", type=int, default=400)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=336)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--rows-per-block", type=int, default=DataConfig.model_fields["rows_per_block"].default
    )
    parser.add_argument(
        "--preprocess-num-cpus", type=float, default=DataConfig.model_fields["preprocess_num_cpus"].default
    )
    parser.add_argument(
        "--preprocess-pool",
        nargs="+",
        choices=["tasks", "actors"],
        default=["tasks", "actors"],
        help="pipelines to run, one after the other, each against the same crop engine figures",
    )
    parser.add_argument(
        "--preprocess-blocks-per-actor",
        type=int,
        default=DataConfig.model_fields["preprocess_blocks_per_actor"].default,
    )
    parser.add_argument("--object-store-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args(argv)

    zoom = ZoomConfig(resolution=args.resolution)
    processor = DragonflyProcessor(build_tiny_tokenizer(), zoom, TokenConfig(), max_length=4096)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        manifest = make_manifest(Path(tmp) / "data", args.samples, args.seed)
        paths = [str(Path(tmp) / "data" / r.image) for r in read_manifest(str(manifest))]
        # The host's speed drifts within minutes: the crop engine runs before each pipeline and after
        # the last, and each pipeline is compared with the runs on either side of it.
        engines = [crop_engine_rate(paths[: args.baseline_samples], zoom, args.cpus)]
        pipelines = {}
        for pool in args.preprocess_pool:
            # A process of its own per pipeline: a fresh Ray (Ray reads its head's settings once, at
            # import) and no warm workers inherited from the run before.
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as driver:
                pipelines[pool] = driver.submit(
                    run_on_fresh_ray, manifest, processor, pool, args, tmp
                ).result()
            engines.append(crop_engine_rate(paths[: args.baseline_samples], zoom, args.cpus))
    rates = [run["samples_per_s"] for run in engines]
    baseline = {"samples_per_s": sum(rates) / len(rates), "runs": engines}
    for (before, after), pipeline in zip(pairwise(rates), pipelines.values(), strict=True):
        pipeline["crop_engine_samples_per_s"] = reference = (before + after) / 2
        pipeline["over_crop_engine"] = pipeline["samples_per_s"] / reference
        pipeline["steady_over_crop_engine"] = pipeline["steady_samples_per_s"] / reference

    result = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "n_tiles": zoom.n_tiles,
        "crop_engine_alone": baseline,
        "pipelines": pipelines,
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    mib = 1024**2
    pools = list(pipelines)
    print(
        "crop engine alone (samples/s), before each pipeline and after the last: "
        + ", ".join(f"{r:.1f}" for r in rates)
    )
    print(f"{'pipeline (preprocess_pool)':<40}" + "".join(f"{pool:>14}" for pool in pools))
    print("-" * (40 + 14 * len(pools)))
    rows = [
        ("crop engine, either side (samples/s)", lambda p: f"{p['crop_engine_samples_per_s']:.2f}"),
        ("end to end (samples/s)", lambda p: f"{p['samples_per_s']:.2f}"),
        ("after first batch (samples/s)", lambda p: f"{p['steady_samples_per_s']:.2f}"),
        ("first batch after (s)", lambda p: f"{p['first_batch_s']:.1f}" if p["first_batch_s"] else "-"),
        ("end to end / crop engine", lambda p: f"{p['over_crop_engine']:.0%}"),
        ("after first batch / crop engine", lambda p: f"{p['steady_over_crop_engine']:.0%}"),
        ("bytes per sample (MiB)", lambda p: f"{p['bytes_per_sample'] / mib:.2f}"),
        ("peak object store (MiB)", lambda p: f"{p['peak_object_store_bytes'] / mib:.0f}"),
        ("spilled (MiB)", lambda p: f"{p['spilled_bytes'] / mib:.0f}"),
        ("samples", lambda p: f"{p['samples']}"),
    ]
    for name, value in rows:
        print(f"{name:<40}" + "".join(f"{value(pipelines[pool]):>14}" for pool in pools))
    print("CPU ms per sample, by role:")
    roles = sorted({role for p in pipelines.values() for role in p["cpu_seconds_by_role"]})
    for role in roles:
        print(
            f"  {role:<38}"
            + "".join(
                f"{1000 * p['cpu_seconds_by_role'].get(role, 0.0) / max(p['samples'], 1):>14.1f}"
                for p in pipelines.values()
            )
        )
    # Both processes are busy throughout, so cores x wall time per sample is their CPU time per sample.
    print(
        f"  {'crop engine alone (cpus x wall per sample)':<38}{1000 * args.cpus / baseline['samples_per_s']:>14.1f}"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
