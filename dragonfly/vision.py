"""The vision tower: uint8 crops in, penultimate-block ViT tokens out.

Any open_clip ``VisionTransformer`` works: a built-in architecture with a pretrained tag
(production: ``ViT-L-14-336`` with OpenAI weights), a local weights file, or an inline
``model_config`` (tiny configs for tests). Features are the output of the second-to-last
transformer block, before the final norm, as in the released Dragonfly (which takes
``hidden_states[-2]`` of a Hugging Face ``CLIPVisionModel``). The last block, the final norm and the
projection head are pruned right after the weights load: they would compute nothing we use, and
parameters without gradients trip up DDP and ZeRO-3.

Crops cross the wire as uint8; scaling, CLIP mean/std normalisation and the cast to the compute
dtype happen here, on the device. All crops of a batch go through the ViT together, in chunks of
``chunk_size`` crops to bound activation memory.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from dragonfly.config import ConfigError, config_from_dict


@dataclass(frozen=True)
class VisionConfig:
    """Which open_clip tower to build and how to run it.

    ``pretrained`` is an open_clip tag (``"openai"``); ``weights_path`` a local open_clip checkpoint
    (``.pt``/``.bin``/``.safetensors``). An ``s3://`` path is refused here on purpose: the model
    library never talks to object stores, so the platform layer (``dragonfly_platform.storage``)
    downloads the file and passes the local path. Neither set: random weights (tests, or a model
    whose weights come from ``DragonflyModel.from_pretrained``).

    ``model_config`` is an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)
    registered under ``model_name``; leave it ``None`` for open_clip's built-in architectures.
    ``quick_gelu`` must match how the weights were trained: OpenAI's CLIP (and so the released
    Dragonfly) uses QuickGELU. ``pixel_mean`` / ``pixel_std`` default to the weights' own
    preprocessing config (OpenAI's CLIP statistics when there is none); saved models record them, so
    a rebuild without the pretrained tag normalises the same way.
    """

    model_name: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    weights_path: str | None = None
    model_config: dict[str, Any] | None = None
    quick_gelu: bool = True
    chunk_size: int = 64  # crops per ViT forward
    gradient_checkpointing: bool = False
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None

    def __post_init__(self):
        if self.pretrained and self.weights_path:
            raise ConfigError("vision: set either pretrained (an open_clip tag) or weights_path, not both")
        if self.weights_path and "://" in self.weights_path:
            raise ConfigError(
                f"vision.weights_path must be a local file, got {self.weights_path!r}: download remote "
                "weights first (dragonfly_platform.storage does this) and pass the local path"
            )
        if self.chunk_size <= 0:
            raise ConfigError(f"vision.chunk_size must be positive, got {self.chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return config_from_dict(cls, data)


# Names this process registered with open_clip; they may be re-registered with a new config.
_REGISTERED_CONFIGS: set[str] = set()


def _register_model_config(name: str, model_config: dict[str, Any]) -> None:
    existing = open_clip.get_model_config(name)
    if existing == model_config:
        return
    if existing is not None and name not in _REGISTERED_CONFIGS:
        raise ConfigError(
            f"vision.model_name {name!r} is a built-in open_clip model; name a custom config differently"
        )
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(model_config)
    if missing:
        raise ConfigError(f"vision.model_config for {name!r} lacks open_clip keys {sorted(missing)}")
    # open_clip's public registry reads files; the file may go once registered (the registry keeps it).
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(model_config))
        open_clip.add_model_config(path)
    _REGISTERED_CONFIGS.add(name)


class VisionTower(nn.Module):
    """open_clip ViT cut after its penultimate block. ``forward``: uint8 crops -> (cls, patches)."""

    def __init__(self, config: VisionConfig, load_weights: bool = True):
        super().__init__()
        self.config = config
        if config.model_config is not None:
            _register_model_config(config.model_name, config.model_config)
        weights = (config.pretrained or config.weights_path) if load_weights else None
        try:
            clip = open_clip.create_model(
                config.model_name,
                pretrained=weights,
                force_quick_gelu=config.quick_gelu,
                force_patch_dropout=0.0,  # dropping patches would break the square token grid
            )
        except RuntimeError as err:
            if "download" in str(err).lower() or "hub" in str(err).lower():
                raise  # the network, not the config: a retry may succeed
            raise ConfigError(f"vision: cannot build open_clip model {config.model_name!r}: {err}") from err
        visual = clip.visual
        if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
            raise ConfigError(
                f"vision: {config.model_name!r} is not a plain open_clip VisionTransformer (CLS token + square "
                "patch grid), which token pooling needs"
            )
        if visual.grid_size[0] != visual.grid_size[1]:
            raise ConfigError(f"vision: token grid must be square, got {visual.grid_size}")
        if len(visual.transformer.resblocks) < 2:
            raise ConfigError("vision: the ViT needs at least 2 blocks to take the penultimate one")
        # Keep blocks 0 .. n-2: the last kept block's output is HF CLIP's hidden_states[-2].
        visual.prune_intermediate_layers(indices=[-2], prune_norm=True, prune_head=True)
        visual.set_grad_checkpointing(config.gradient_checkpointing)
        self.visual = visual  # the text tower goes with `clip`

        pre = open_clip.get_model_preprocess_cfg(clip)
        # Plain floats, not buffers: a bf16 cast of the model must not round them.
        self.pixel_mean = tuple(float(v) for v in config.pixel_mean or pre["mean"])
        self.pixel_std = tuple(float(v) for v in config.pixel_std or pre["std"])

    def rebuild_config(self) -> VisionConfig:
        """This tower's config with no weight source and its normalisation spelled out: for
        rebuilding a model whose weights come from our own checkpoint (no network, no extra files)."""
        return dataclasses.replace(
            self.config,
            pretrained=None,
            weights_path=None,
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
        )

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    @property
    def grid_side(self) -> int:
        return self.visual.grid_size[0]

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, R, R) -> CLIP-normalised (N, 3, R, R) in the tower's compute dtype."""
        mean = torch.tensor(self.pixel_mean, device=crops.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std, device=crops.device).view(1, 3, 1, 1)
        # Planar float whatever the crops' layout (the data pipeline ships channels-last uint8), so
        # the patch convolution computes the same numbers for both.
        x = crops.to(torch.float32, memory_format=torch.contiguous_format)
        x = (x / 255.0 - mean) / std  # float32 math, then one cast
        return x.to(self.visual.conv1.weight.dtype)

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """crops: uint8 (N, 3, R, R) -> cls (N, C), patches (N, G*G, C), row-major over the grid."""
        if crops.dtype != torch.uint8:
            raise TypeError(f"vision tower expects uint8 crops, got {crops.dtype}")
        if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"vision tower expects crops of shape (N, 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(crops.shape)}"
            )
        cls, patches = [], []
        for chunk in crops.split(self.config.chunk_size):
            out = self.visual.forward_intermediates(
                self.normalize(chunk),
                indices=1,  # the last kept block = the original penultimate block
                output_fmt="NLC",
                intermediates_only=True,
                output_extra_tokens=True,
            )
            cls.append(out["image_intermediates_prefix"][0][:, 0])  # (n, C)
            patches.append(out["image_intermediates"][0])  # (n, G*G, C)
        return torch.cat(cls), torch.cat(patches)


__all__ = ["VisionConfig", "VisionTower"]
