"""Training-step throughput.

CPU (default): the tiny recipe on 2 Ray Train workers with ZeRO 0, 2 and 3 side by side: samples/s
and the share of each step spent waiting for data (the same metrics the training loop logs to
MLflow, read back from there; the first steps, which include pipeline start-up, are left out).

    python benchmarks/train_step.py [--steps 12] [--stages 0 2 3]

GPU (``--gpu``): one process, no Ray, a mid-size Dragonfly with random weights in bf16 (CLIP
ViT-L/14-336 + a 24-layer, 2048-wide Llama, the paper's 41-crop zoom layout), synthetic batches:
ViT crops/s, the training step time, and model FLOPs utilisation with the FLOPs of
``dragonfly.budget`` (forward FLOPs x 3 for forward + backward).

    python benchmarks/train_step.py --gpu [--micro-batch 1] [--peak-tflops 989]

Results print as a table and go to ``benchmarks/results/train_step_{cpu,gpu}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WARMUP_STEPS = 2


# ---------------------------------------------------------------------------------------------- CPU


def cpu_benchmark(steps: int, stages: list[int], num_cpus: float) -> list[dict]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from mlflow.tracking import MlflowClient

    from dragonfly_platform.cli import start_local_ray
    from dragonfly_platform.config import load_run_config
    from dragonfly_platform.demo_data import write_demo_dataset
    from dragonfly_platform.train import run_training

    work = Path(tempfile.mkdtemp(prefix="dragonfly-bench-"))
    demo = write_demo_dataset(work / "demo", n_train=64, n_val=8)
    start_local_ray(num_cpus)
    rows = []
    try:
        for stage in stages:
            cfg = load_run_config(
                ROOT / "jobs" / "configs" / "tiny_stage1.yaml",
                [
                    f"run.name=bench-zero{stage}",
                    f"run.storage_path={work / 'runs'}",
                    f"data.train_manifest={demo['train_manifest']}",
                    f"data.val_manifest={demo['val_manifest']}",
                    "train.freeze=stage2",  # everything trains (ZeRO-3 refuses a frozen tower)
                    "model.vision.chunk_size=82",  # one ViT call per micro-batch, as ZeRO-3 needs
                    f"train.zero_stage={stage}",
                    f"train.max_steps={steps}",
                    f"train.checkpoint_every={steps}",
                    "train.eval_batches=0",
                ],
            )
            started = time.perf_counter()
            result = run_training(cfg)
            wall = time.perf_counter() - started
            history = _SteadyHistory(MlflowClient(cfg.tracking_uri()), result.metrics["mlflow_run_id"])

            rows.append(
                {
                    "zero_stage": stage,
                    "workers": cfg.run.num_workers,
                    "global_batch": cfg.train.global_batch_size,
                    "steps": steps,
                    "samples_per_s": history.median("samples_per_s"),
                    "tokens_per_s": history.median("tokens_per_s"),
                    "data_wait_share": history.median("data_wait_share"),
                    "run_wall_s": round(wall, 1),
                }
            )
    finally:
        ray.shutdown()
    return rows


class _SteadyHistory:
    """Median of a logged metric over the steps after the warm-up ones."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def median(self, metric: str) -> float:
        history = self.client.get_metric_history(self.run_id, metric)
        return statistics.median(m.value for m in history if m.step > WARMUP_STEPS)


# ---------------------------------------------------------------------------------------------- GPU

# A mid-size Llama: 24 layers, width 2048 (about 1.3 B parameters with the 128K vocabulary).
MID_LLM = {
    "model_type": "llama",
    "vocab_size": 128_256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
}


def gpu_benchmark(micro_batch: int, steps: int, peak_tflops: float) -> dict:
    import torch

    from dragonfly.budget import TransformerDims, llm_flops, projection_flops, vit_flops
    from dragonfly.model import DragonflyConfig, DragonflyModel
    from dragonfly.vision import VisionConfig

    device = torch.device("cuda")
    config = DragonflyConfig(
        image_token_id=MID_LLM["vocab_size"] - 1,
        vision=VisionConfig(model_name="ViT-L-14-336", pretrained=None, gradient_checkpointing=True),
        llm_name_or_path=None,
        llm_config=MID_LLM,
        attn_implementation="sdpa",
        dtype="bfloat16",
    )
    model = DragonflyModel(config, load_weights=False).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    layout = config.layout
    text = 256
    seq = layout.positions + text
    crops = layout.n_crops
    res = config.zoom.resolution

    # Synthetic batch: one image block then text, all supervised except the image.
    ids = torch.randint(0, MID_LLM["vocab_size"] - 2, (micro_batch, seq), device=device)
    ids[:, 1 : 1 + layout.positions] = config.image_token_id
    labels = ids.masked_fill(ids == config.image_token_id, -100)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixels": torch.randint(0, 256, (micro_batch, crops, 3, res, res), dtype=torch.uint8, device=device),
        "has_image": torch.ones(micro_batch, dtype=torch.bool, device=device),
    }

    def timed(fn, repeats: int) -> float:
        fn()  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - started) / repeats

    with torch.no_grad():
        vit_s = timed(lambda: model.vision(batch["pixels"].flatten(0, 1)), repeats=5)

    def train_step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = timed(train_step, repeats=steps)

    llm_dims = TransformerDims(
        n_layers=MID_LLM["num_hidden_layers"],
        n_heads=MID_LLM["num_attention_heads"],
        d_model=MID_LLM["hidden_size"],
        d_ff=MID_LLM["intermediate_size"],
    )
    # Appendix-F accounting of dragonfly.budget over the whole sequence (image block + text).
    forward = (
        crops * vit_flops(res, 14)
        + projection_flops(layout.image_tokens, vision_dim=1024, llm_dim=MID_LLM["hidden_size"])
        + llm_flops(seq, llm_dims)
    )
    flops_per_step = 3 * micro_batch * forward  # forward + backward (2x forward)
    return {
        "gpu": torch.cuda.get_device_name(),
        "micro_batch": micro_batch,
        "crops_per_image": crops,
        "sequence": seq,
        "vit_crops_per_s": micro_batch * crops / vit_s,
        "step_s": step_s,
        "samples_per_s": micro_batch / step_s,
        "model_tflops_per_step": flops_per_step / 1e12,
        "mfu": flops_per_step / step_s / (peak_tflops * 1e12),
        "peak_tflops": peak_tflops,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="the single-GPU mid-size benchmark")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3], help="ZeRO stages (CPU)")
    parser.add_argument("--num-cpus", type=float, default=4, help="logical CPUs of the local Ray (CPU)")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per step (GPU)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200: 989)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)

    if args.gpu:
        result = gpu_benchmark(args.micro_batch, args.steps, args.peak_tflops)
        (RESULTS / "train_step_gpu.json").write_text(json.dumps(result, indent=2))
        for key, value in result.items():
            print(f"{key:>24}: {value:.4g}" if isinstance(value, float) else f"{key:>24}: {value}")
        return 0

    rows = cpu_benchmark(args.steps, args.stages, args.num_cpus)
    (RESULTS / "train_step_cpu.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'ZeRO':>5}{'samples/s':>12}{'tokens/s':>11}{'data wait':>11}{'run (s)':>9}")
    for row in rows:
        print(
            f"{row['zero_stage']:>5}{row['samples_per_s']:>12.2f}{row['tokens_per_s']:>11.0f}"
            f"{100 * row['data_wait_share']:>10.0f}%{row['run_wall_s']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
