"""Our run config -> DeepSpeed's config dict, and the optimizer / schedule DeepSpeed is handed.

DeepSpeed gets a torch optimizer object (AdamW over ``dragonfly.model.param_groups``, so norms and
biases skip weight decay) and a torch ``LambdaLR`` (warmup then cosine), instead of naming them in its
JSON: no ``fused_adam`` compile on CPU, one schedule implementation for CPU and GPU, and DeepSpeed
still checkpoints both. Only the numbers differ between CPU and GPU (precision, offload, fused kernels).
"""

from __future__ import annotations

import math
from typing import Any

from dragonfly_platform.config import RunConfig, TrainConfig

# DeepSpeed prints a throughput line every `steps_per_print` steps; our own logging replaces it.
_QUIET_STEPS = 10**9


def build_deepspeed_config(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """The ``config=`` dict for ``deepspeed.initialize``.

    ``world_size`` defaults to ``cfg.run.num_workers`` (data parallel only: every worker is one rank).
    """
    train = cfg.train
    world_size = world_size or cfg.run.num_workers
    accumulation = cfg.gradient_accumulation_steps(world_size)
    bf16 = cfg.resolved_precision() == "bf16"
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        # Overlapping reduction with backward and contiguous gradient buffers: DeepSpeed's own
        # recommended settings; harmless on CPU.
        zero.update(overlap_comm=cfg.run.use_gpu, contiguous_gradients=True)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if train.zero_stage == 3:
        # The end-of-run export gathers full weights through GatheredParameters; this makes
        # `save_16bit_model` usable too and keeps ZeRO-3 checkpoints convertible by zero_to_fp32.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        # Our optimizer is a plain torch AdamW (or DeepSpeedCPUAdam when offloading), not one of
        # DeepSpeed's named optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def build_optimizer(param_groups: list[dict[str, Any]], cfg: RunConfig):
    """AdamW over ``param_groups``: DeepSpeedCPUAdam when the optimizer state is offloaded (ZeRO-Offload
    refuses other optimizers), torch's fused AdamW on GPU, torch's default AdamW on CPU."""
    train = cfg.train
    kwargs = dict(lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    if train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, adamw_mode=True, **kwargs)
    import torch

    return torch.optim.AdamW(param_groups, fused=cfg.run.use_gpu, **kwargs)


def lr_multiplier(step: int, total_steps: int, train: TrainConfig) -> float:
    """Learning-rate factor after ``step`` optimizer steps: linear warmup over
    ``ceil(warmup_ratio * total_steps)`` steps, then cosine (or linear / constant) down to
    ``min_lr_ratio``."""
    warmup = math.ceil(train.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if train.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if train.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        decay = 1.0 - progress
    return train.min_lr_ratio + (1.0 - train.min_lr_ratio) * decay


def build_scheduler(optimizer, total_steps: int, train: TrainConfig):
    """A ``LambdaLR`` over ``lr_multiplier``; DeepSpeed steps it once per optimizer step."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, train))


__all__ = ["build_deepspeed_config", "build_optimizer", "build_scheduler", "lr_multiplier"]
