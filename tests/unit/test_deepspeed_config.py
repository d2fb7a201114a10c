"""Our run config -> DeepSpeed config, optimizer and learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dragonfly_platform.config import parse_run_config
from dragonfly_platform.deepspeed_config import (
    build_deepspeed_config,
    build_optimizer,
    build_scheduler,
    lr_multiplier,
)

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny_stage1.yaml"


def cfg_with(train=None, run=None):
    raw = yaml.safe_load(TINY.read_text())
    raw["model"]["vision"] = {"chunk_size": 82}  # one ViT call per micro-batch, as ZeRO-3 needs
    raw["train"].update(train or {})
    raw["run"].update(run or {})
    return parse_run_config(raw)


def test_batch_sizes_and_accumulation_are_consistent():
    cfg = cfg_with({"global_batch_size": 64, "micro_batch_size": 4, "zero_stage": 2}, {"num_workers": 2})
    ds = build_deepspeed_config(cfg)
    assert ds["gradient_accumulation_steps"] == 8
    # DeepSpeed's own invariant: train_batch = micro * accumulation * world size.
    assert (
        ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    )
    assert build_deepspeed_config(cfg, world_size=16)["gradient_accumulation_steps"] == 1


def test_cpu_runs_fp32_gpu_runs_bf16():
    cpu = build_deepspeed_config(cfg_with())
    gpu = build_deepspeed_config(cfg_with(run={"use_gpu": True}))
    assert cpu["bf16"] == {"enabled": False} and cpu["fp16"] == {"enabled": False}
    assert gpu["bf16"] == {"enabled": True}
    assert cpu["gradient_clipping"] == 1.0
    assert cpu["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_passes_through(stage):
    plan = "stage2" if stage == 3 else "stage1"
    zero = build_deepspeed_config(cfg_with({"zero_stage": stage, "freeze": plan}))["zero_optimization"]
    assert zero["stage"] == stage
    assert ("stage3_gather_16bit_weights_on_model_save" in zero) == (stage == 3)
    assert "offload_optimizer" not in zero and "offload_param" not in zero


def test_offload_sections():
    cfg = cfg_with(
        {"zero_stage": 3, "freeze": "stage2", "offload_optimizer": True, "offload_params": True},
        {"use_gpu": True},
    )
    zero = build_deepspeed_config(cfg)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


def test_deepspeed_accepts_the_generated_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = cfg_with({"global_batch_size": 8, "micro_batch_size": 2, "zero_stage": 2}, {"num_workers": 1})
    parsed = DeepSpeedConfig(build_deepspeed_config(cfg))
    assert parsed.train_batch_size == 8
    assert parsed.gradient_accumulation_steps == 4
    assert parsed.zero_optimization_stage == 2
    assert parsed.gradient_clipping == 1.0


def test_warmup_then_cosine_to_the_floor():
    train = cfg_with({"warmup_ratio": 0.1, "schedule": "cosine", "min_lr_ratio": 0.1}).train
    total = 100
    factors = [lr_multiplier(step, total, train) for step in range(total + 1)]
    warmup = 10
    assert factors[0] == pytest.approx(1 / warmup)
    assert factors[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[: warmup - 1], factors[1:warmup], strict=True))  # rising
    assert factors[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warmup:-1], factors[warmup + 1 :], strict=True))  # falling
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert factors[total] == pytest.approx(0.1)


def test_one_percent_warmup_is_at_least_one_step():
    train = cfg_with({"warmup_ratio": 0.01}).train
    assert lr_multiplier(0, 16, train) == 1.0  # ceil(0.16) = 1 warmup step
    assert lr_multiplier(1, 16, train) == 1.0
    assert lr_multiplier(16, 16, train) == pytest.approx(0.0)


def test_linear_and_constant_schedules():
    linear = cfg_with({"warmup_ratio": 0.0, "schedule": "linear"}).train
    constant = cfg_with({"warmup_ratio": 0.0, "schedule": "constant"}).train
    assert lr_multiplier(5, 10, linear) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, constant) == 1.0


def test_optimizer_groups_and_scheduler_steps():
    cfg = cfg_with({"lr": 1e-3, "weight_decay": 0.1, "warmup_ratio": 0.5})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = build_optimizer(groups, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    scheduler = build_scheduler(optimizer, total_steps=4, train=cfg.train)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])  # warmup 2 steps, cosine over the other 2
