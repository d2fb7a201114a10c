"""Configuration objects of the Dragonfly model library.

Plain frozen dataclasses with a JSON round trip (``to_dict`` / ``from_dict``). The crop engine
(``dragonfly.zoom``), the token budget (``dragonfly.budget``) and the model all read the same
objects, so "how many crops" and "how many tokens per crop" are defined in exactly one place.

Vocabulary (shared with LLaVA-NeXT): a *grid* is ``(columns, rows)`` of sub-images; its pixel size
is ``(columns * R, rows * R)`` as ``(width, height)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

LEVELS: tuple[str, ...] = ("low", "medium", "high")
GridRule = Literal["released", "aspect"]
ResizeBackend = Literal["torch", "pil"]
ZoomSource = Literal["native", "low"]

# The paper's medium grids as (columns, rows), in the released code's order: ties go to the first.
PAPER_MEDIUM_GRIDS: tuple[tuple[int, int], ...] = ((2, 2), (1, 4), (4, 1))
# Tokens per sub-image a square mean-pooling window can give from CLIP ViT-L/14-336's 24x24 grid.
PAPER_TOKEN_CHOICES: tuple[int, ...] = (576, 144, 64, 36, 16, 9)


class ConfigError(ValueError):
    """A configuration that cannot work; raised before any work starts."""


def config_from_dict(cls, data: dict[str, Any]):
    """Build a config dataclass from a JSON dict, rejecting unknown keys with the known ones listed."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _tupleize(value)
    return cls(**kwargs)


def _tupleize(value):
    # JSON has no tuples; frozen configs must stay hashable, so lists come back as tuples.
    if isinstance(value, list):
        return tuple(_tupleize(v) for v in value)
    return value


@dataclass(frozen=True)
class ZoomConfig:
    """What the crop engine produces for one image.

    ``levels`` is any non-empty subset of ``LEVELS`` (the paper's Table 2: L, M, H, L+M, L+H, L+M+H).
    The high grid is always the chosen medium grid scaled by ``high_scale`` (6x6, 3x12, 12x3), as in
    the released code, so one grid decision serves both levels.
    """

    resolution: int = 336
    levels: tuple[str, ...] = LEVELS
    medium_grids: tuple[tuple[int, int], ...] = PAPER_MEDIUM_GRIDS
    high_scale: int = 3
    grid_rule: GridRule = "released"
    # "low": medium and high are made from the low-resolution image (the paper's Table 3 ablation).
    zoom_source: ZoomSource = "native"
    backend: ResizeBackend = "torch"
    # Images with more pixels than this are refused before decoding (decompression bombs).
    max_image_pixels: int = 120_000_000

    def __post_init__(self):
        if self.resolution <= 0:
            raise ConfigError(f"zoom.resolution must be positive, got {self.resolution}")
        if not self.levels or any(lv not in LEVELS for lv in self.levels):
            raise ConfigError(f"zoom.levels must be a non-empty subset of {LEVELS}, got {self.levels}")
        if len(set(self.levels)) != len(self.levels):
            raise ConfigError(f"zoom.levels has duplicates: {self.levels}")
        # Canonical order keeps the tile order [low] + medium + high whatever the user wrote.
        object.__setattr__(self, "levels", tuple(lv for lv in LEVELS if lv in self.levels))
        if not self.medium_grids:
            raise ConfigError("zoom.medium_grids must not be empty")
        counts = {c * r for c, r in self.medium_grids}
        if len(counts) != 1:
            # Fixed-shape crop arrays (and fixed token counts) need every candidate to tile alike.
            raise ConfigError(
                f"zoom.medium_grids must all have the same number of tiles, got {self.medium_grids}"
            )
        if any(c <= 0 or r <= 0 for c, r in self.medium_grids):
            raise ConfigError(f"zoom.medium_grids must be positive, got {self.medium_grids}")
        if self.high_scale < 1:
            raise ConfigError(f"zoom.high_scale must be >= 1, got {self.high_scale}")
        if self.grid_rule not in ("released", "aspect"):
            raise ConfigError(f"zoom.grid_rule must be 'released' or 'aspect', got {self.grid_rule!r}")
        if self.zoom_source not in ("native", "low"):
            raise ConfigError(f"zoom.zoom_source must be 'native' or 'low', got {self.zoom_source!r}")
        if self.backend not in ("torch", "pil"):
            raise ConfigError(f"zoom.backend must be 'torch' or 'pil', got {self.backend!r}")
        if self.max_image_pixels <= 0:
            raise ConfigError("zoom.max_image_pixels must be positive")

    @property
    def high_grids(self) -> tuple[tuple[int, int], ...]:
        return tuple((c * self.high_scale, r * self.high_scale) for c, r in self.medium_grids)

    def tiles_per_level(self) -> dict[str, int]:
        """Sub-images per enabled level, in tile order."""
        medium = self.medium_grids[0][0] * self.medium_grids[0][1]
        per_level = {"low": 1, "medium": medium, "high": medium * self.high_scale**2}
        return {lv: per_level[lv] for lv in self.levels}

    @property
    def n_tiles(self) -> int:
        return sum(self.tiles_per_level().values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZoomConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class TokenConfig:
    """How many LLM positions each sub-image becomes.

    ``tokens`` maps level -> pooled patch tokens per sub-image; each must be a square ``k*k`` whose
    side ``k`` divides the vision tower's token grid side (24 for ViT-L/14 at 336 px), so mean pooling
    uses kernel = stride = grid_side / k. ``keep_cls`` adds the ViT's CLS token in front of each
    sub-image (the released model keeps it); ``separator`` puts one separator position after each
    sub-image.
    """

    tokens: tuple[tuple[str, int], ...] = (("low", 576), ("medium", 36), ("high", 36))
    keep_cls: bool = True
    separator: bool = True

    def __post_init__(self):
        if isinstance(self.tokens, dict):
            object.__setattr__(self, "tokens", tuple(self.tokens.items()))
        levels = [lv for lv, _ in self.tokens]
        if any(lv not in LEVELS for lv in levels) or len(set(levels)) != len(levels):
            raise ConfigError(f"tokens must map each of {LEVELS} at most once, got {self.tokens}")
        for lv, n in self.tokens:
            side = math.isqrt(n)
            if n <= 0 or side * side != n:
                raise ConfigError(f"tokens[{lv}] must be a positive square number (k*k), got {n}")

    def per_level(self) -> dict[str, int]:
        return dict(self.tokens)

    def for_level(self, level: str) -> int:
        try:
            return self.per_level()[level]
        except KeyError:
            raise ConfigError(f"no token count configured for level {level!r}") from None

    def pool_stride(self, level: str, grid_side: int) -> int:
        """Mean-pooling kernel = stride for ``level`` on a ``grid_side`` x ``grid_side`` token grid."""
        side = math.isqrt(self.for_level(level))
        if grid_side % side:
            raise ConfigError(
                f"tokens[{level}]={side * side} needs a {side}x{side} grid, which does not divide the "
                f"vision tower's {grid_side}x{grid_side} token grid"
            )
        return grid_side // side

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": dict(self.tokens), "keep_cls": self.keep_cls, "separator": self.separator}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenConfig:
        data = dict(data)
        if isinstance(data.get("tokens"), dict):
            data["tokens"] = tuple(data["tokens"].items())
        return config_from_dict(cls, data)


__all__ = [
    "LEVELS",
    "PAPER_MEDIUM_GRIDS",
    "PAPER_TOKEN_CHOICES",
    "ConfigError",
    "config_from_dict",
    "ZoomConfig",
    "TokenConfig",
]
