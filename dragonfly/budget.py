"""The image token budget: how many LLM positions an image becomes, and what it costs.

One place computes the token layout of an image block; the processor (which reserves positions in
the text), the model (which fills them) and the FLOPs report all call ``image_token_layout``.

An image block is, for each sub-image in tile order ([low] + medium tiles + high tiles)::

    [CLS]? pooled_patch_tokens... [SEP]?

The paper's Dragonfly: 576 + 4*36 + 36*36 = 2016 pooled tokens, 2057 with one CLS per crop (the
released model keeps CLS), 2098 positions with one separator after each crop.

FLOPs follow the paper's appendix F (Chinchilla accounting, forward pass, one image): the ViT on
every crop, the projector on the LLM-visible image tokens, and the LLM on a context of exactly the
image tokens. ``python -m dragonfly.budget --preset dragonfly --json`` prints both.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from dragonfly.config import LEVELS, ConfigError, TokenConfig, ZoomConfig


@dataclass(frozen=True)
class ImageTokenLayout:
    """Token layout of one image block. Every crop of a level has the same token count."""

    crop_levels: tuple[str, ...]  # level of each crop, tile order
    tokens_per_crop: tuple[int, ...]  # pooled patch tokens of each crop (CLS not included)
    keep_cls: bool
    separator: bool

    @property
    def n_crops(self) -> int:
        return len(self.crop_levels)

    @property
    def image_tokens(self) -> int:
        """Pooled patch tokens (the paper's count: 2016 for Dragonfly)."""
        return sum(self.tokens_per_crop)

    @property
    def image_tokens_with_cls(self) -> int:
        return self.image_tokens + (self.n_crops if self.keep_cls else 0)

    @property
    def positions(self) -> int:
        """Sequence positions the image block occupies (features + separators)."""
        return self.image_tokens_with_cls + (self.n_crops if self.separator else 0)

    def crop_spans(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each crop's feature positions inside the block; a separator, if
        any, sits at ``stop``."""
        spans, pos = [], 0
        for n in self.tokens_per_crop:
            width = n + int(self.keep_cls)
            spans.append((pos, pos + width))
            pos += width + int(self.separator)
        return spans

    def separator_offsets(self) -> list[int]:
        return [stop for _, stop in self.crop_spans()] if self.separator else []

    def per_level(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for level, n in zip(self.crop_levels, self.tokens_per_crop, strict=True):
            entry = out.setdefault(level, {"crops": 0, "tokens_per_crop": n, "tokens": 0})
            entry["crops"] += 1
            entry["tokens"] += n
        return out


def image_token_layout(zoom: ZoomConfig, tokens: TokenConfig) -> ImageTokenLayout:
    levels: list[str] = []
    counts: list[int] = []
    for level, n_tiles in zoom.tiles_per_level().items():
        levels += [level] * n_tiles
        counts += [tokens.for_level(level)] * n_tiles
    return ImageTokenLayout(tuple(levels), tuple(counts), tokens.keep_cls, tokens.separator)


# ---------------------------------------------------------------------------------------------
# FLOPs, appendix F of the paper (DeepMind's Chinchilla accounting), forward pass of one image.


@dataclass(frozen=True)
class TransformerDims:
    n_layers: int
    n_heads: int
    d_model: int
    d_ff: int


CLIP_VIT_L_14 = TransformerDims(n_layers=24, n_heads=16, d_model=1024, d_ff=4096)
LLAMA_3_8B = TransformerDims(n_layers=32, n_heads=32, d_model=4096, d_ff=14336)


def layer_flops(n_ctx: int, dims: TransformerDims) -> int:
    d, h = dims.d_model, dims.n_heads
    inner = (d // h) * h
    attention = (
        2 * n_ctx * 3 * d * inner  # qkv
        + 2 * n_ctx * n_ctx * inner  # logits
        + 3 * h * n_ctx * n_ctx  # softmax
        + 2 * n_ctx * n_ctx * inner  # reduce
        + 2 * n_ctx * inner * d  # output projection
    )
    feed_forward = 2 * n_ctx * (2 * d * dims.d_ff)
    return attention + feed_forward


def vit_flops(image_size: int = 336, patch_size: int = 14, dims: TransformerDims = CLIP_VIT_L_14) -> int:
    n_patches = (image_size // patch_size) ** 2
    embeddings = 2 * n_patches * patch_size * patch_size * 3 * dims.d_model
    return embeddings + dims.n_layers * layer_flops(n_patches + 1, dims)


def projection_flops(n_tokens: int, vision_dim: int = 1024, llm_dim: int = 4096) -> int:
    return 2 * vision_dim * llm_dim * n_tokens


def llm_flops(n_tokens: int, dims: TransformerDims = LLAMA_3_8B) -> int:
    return 2 * n_tokens * dims.d_model + dims.n_layers * layer_flops(n_tokens, dims)


@dataclass(frozen=True)
class FlopsReport:
    crops: int
    image_tokens: int
    vit_flops: int
    projection_flops: int
    llm_flops: int

    @property
    def total_flops(self) -> int:
        return self.vit_flops + self.projection_flops + self.llm_flops

    @property
    def tflops(self) -> float:
        return self.total_flops / 1e12


def image_flops(
    crops: int,
    image_tokens: int,
    image_size: int = 336,
    patch_size: int = 14,
    vit: TransformerDims = CLIP_VIT_L_14,
    llm: TransformerDims = LLAMA_3_8B,
) -> FlopsReport:
    return FlopsReport(
        crops=crops,
        image_tokens=image_tokens,
        vit_flops=crops * vit_flops(image_size, patch_size, vit),
        projection_flops=projection_flops(image_tokens, vit.d_model, llm.d_model),
        llm_flops=llm_flops(image_tokens, llm),
    )


def layout_flops(layout: ImageTokenLayout, **dims) -> FlopsReport:
    """FLOPs of a Dragonfly layout with the paper's accounting (pooled tokens, no CLS/separators)."""
    return image_flops(layout.n_crops, layout.image_tokens, **dims)


# Presets: (crops, image tokens) for the baselines of Table 11, and Dragonfly configs as layouts.
DRAGONFLY_PRESETS: dict[str, TokenConfig] = {
    "dragonfly": TokenConfig(tokens=(("low", 576), ("medium", 36), ("high", 36))),
    "dragonfly_star": TokenConfig(tokens=(("low", 64), ("medium", 36), ("high", 16))),
}
BASELINE_PRESETS: dict[str, tuple[int, int]] = {
    "llava_hd": (5, 5 * 576),  # LLaVA-1.5-HD: low + 2x2 medium, 576 tokens each
    "llava_uhd": (6, 6 * 64),  # LLaVA-UHD: at most 6 crops of 64 tokens
}
PRESETS = (*DRAGONFLY_PRESETS, *BASELINE_PRESETS)


def preset_report(name: str, zoom: ZoomConfig | None = None) -> dict:
    if name in BASELINE_PRESETS:
        crops, tokens = BASELINE_PRESETS[name]
        report = image_flops(crops, tokens)
        return {"preset": name, "crops": crops, "image_tokens": tokens, **_flops_dict(report)}
    if name in DRAGONFLY_PRESETS:
        return config_report(zoom or ZoomConfig(), DRAGONFLY_PRESETS[name], preset=name)
    raise ConfigError(f"unknown preset {name!r}; choose from {list(PRESETS)}")


def config_report(zoom: ZoomConfig, tokens: TokenConfig, preset: str | None = None) -> dict:
    layout = image_token_layout(zoom, tokens)
    return {
        "preset": preset,
        "levels": list(zoom.levels),
        "crops": layout.n_crops,
        "image_tokens": layout.image_tokens,
        "image_tokens_with_cls": layout.image_tokens_with_cls,
        "positions": layout.positions,
        "per_level": layout.per_level(),
        **_flops_dict(layout_flops(layout, image_size=zoom.resolution)),
    }


def _flops_dict(report: FlopsReport) -> dict:
    return {
        "vit_flops": report.vit_flops,
        "projection_flops": report.projection_flops,
        "llm_flops": report.llm_flops,
        "total_flops": report.total_flops,
        "tflops": round(report.tflops, 2),
    }


def _parse_tokens(text: str) -> tuple[tuple[str, int], ...]:
    """``low=64,medium=36,high=16`` -> (("low", 64), ...)."""
    pairs = []
    for part in filter(None, text.split(",")):
        level, _, value = part.partition("=")
        if level not in LEVELS or not value.isdigit():
            raise ConfigError(f"--tokens expects level=count pairs like low=64,medium=36, got {part!r}")
        pairs.append((level, int(value)))
    return tuple(pairs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dragonfly.budget",
        description="Image tokens and forward TFLOPs per image (the paper's appendix F accounting).",
    )
    parser.add_argument("--preset", action="append", choices=PRESETS, help="repeatable; default: all")
    parser.add_argument("--levels", help="custom config: comma-separated subset of low,medium,high")
    parser.add_argument("--tokens", help="custom config: e.g. low=576,medium=36,high=36")
    parser.add_argument("--no-cls", action="store_true", help="custom config: drop the CLS token")
    parser.add_argument("--no-separator", action="store_true", help="custom config: no separators")
    parser.add_argument("--resolution", type=int, default=336)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    try:
        reports = []
        zoom = ZoomConfig(resolution=args.resolution)
        if args.levels or args.tokens:
            levels = tuple(args.levels.split(",")) if args.levels else zoom.levels
            zoom = ZoomConfig(resolution=args.resolution, levels=levels)
            tokens = TokenConfig(
                tokens=_parse_tokens(args.tokens) if args.tokens else TokenConfig().tokens,
                keep_cls=not args.no_cls,
                separator=not args.no_separator,
            )
            reports.append(config_report(zoom, tokens, preset="custom"))
        for name in args.preset or ([] if reports else PRESETS):
            reports.append(preset_report(name, zoom))
    except ConfigError as err:
        parser.error(str(err))

    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    header = f"{'config':<16}{'crops':>7}{'image tokens':>14}{'with CLS':>10}{'positions':>11}{'TFLOPs':>9}"
    print(header)
    print("-" * len(header))
    for r in reports:
        print(
            f"{r['preset']:<16}{r['crops']:>7}{r['image_tokens']:>14}"
            f"{r.get('image_tokens_with_cls', '-'):>10}{r.get('positions', '-'):>11}{r['tflops']:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "ImageTokenLayout",
    "image_token_layout",
    "TransformerDims",
    "image_flops",
    "layout_flops",
    "preset_report",
    "config_report",
    "FlopsReport",
]
