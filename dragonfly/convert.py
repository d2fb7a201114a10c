"""Load the released Dragonfly-v2 checkpoints into ``DragonflyModel``.

The released Hugging Face checkpoints (``togethercomputer/Llama-3.1-8B-Dragonfly-v2`` and the
``-Med-v2`` variant) hold three groups of tensors:

- ``image_encoder.vision_model.*``: a ``transformers`` ``CLIPVisionModel`` (ViT-L/14-336, QuickGELU);
- ``vision_embed_tokens.{weight,bias}``: one ``Linear(1024, 4096)`` projector;
- ``language_model.*``: a ``LlamaForCausalLM``.

The CLIP weights are renamed into open_clip's ``VisionTransformer`` layout (q/k/v projections
concatenated into ``in_proj_weight``). The ViT's last block and final norm are dropped: the released
model reads ``hidden_states[-2]`` and never uses them, and our tower is pruned the same way.
The released image block has 2098 positions: every crop's CLS and pooled tokens, then one
"image newline" position holding the LLM's word embedding of ``<|reserved_special_token_1|>``
(``IMAGE_NEWLINE_TOKEN`` in the released ``processing_dragonfly.py``; id 128003 in Llama-3's
vocabulary). That is our layout with ``tokens.separator = true``, the separator being that one
embedding row, so the converter copies the row into ``projector.separator`` and the converted model
sees exactly the block it was trained on.

CLI: ``python -m dragonfly.convert SRC_DIR DST_DIR [--config dragonfly_config.json]``; SRC_DIR holds
the released ``*.safetensors`` shards and ``config.json``; DST_DIR gets ``save_pretrained`` output.
When SRC_DIR also holds the released tokenizer (as the Hugging Face repositories do), DST_DIR gets a
``DragonflyProcessor`` too, with ``chat_template="released"`` (the prompt the checkpoint was trained
on) and ``<image>`` added to the tokenizer, whose id the model config takes: the folder is then a
complete export that ``jobs/evaluate.py`` and ``train.init_from`` load as they are.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from dragonfly.config import ConfigError, TokenConfig, ZoomConfig
from dragonfly.model import DragonflyConfig, DragonflyModel
from dragonfly.vision import VisionConfig, VisionTower

log = logging.getLogger(__name__)

RELEASED_PREFIXES = {
    "image_encoder.": "vision",
    "vision_embed_tokens.": "projector",
    "language_model.": "llm",
}
# Per-layer renames, HF CLIP -> open_clip (q/k/v are handled separately: they are concatenated).
_LAYER_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_TOP_RENAMES = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
# The released crops and image block: R = 336, all three levels; one CLS and one image newline per crop.
RELEASED_ZOOM = ZoomConfig()
RELEASED_TOKENS = TokenConfig(keep_cls=True, separator=True)
# The released processor's image newline, and its id in Llama-3's tokenizer.
RELEASED_IMAGE_NEWLINE_TOKEN = "<|reserved_special_token_1|>"
RELEASED_IMAGE_NEWLINE_ID = 128003
# Buffers some checkpoints carry that are recomputed at build time.
_IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class ConversionReport:
    dropped: list[str] = field(default_factory=list)  # source tensors the model does not use
    initialised: list[str] = field(default_factory=list)  # model tensors the source does not have


def clip_vision_to_open_clip(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``transformers`` ``CLIPVisionModel`` state dict (keys with or without ``vision_model.``) ->
    an open_clip ``VisionTransformer`` state dict (keys relative to ``visual``), every layer kept."""
    state = {k.removeprefix("vision_model."): v for k, v in hf_state.items() if not _IGNORED.search(k)}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"CLIP vision weights: unexpected tensor {key!r}")
        layer, module, kind = int(match[1]), match[2], match[3]
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault(layer, {})[f"{module[-6]}.{kind}"] = value
        elif module in _LAYER_RENAMES:
            out[f"transformer.resblocks.{layer}.{_LAYER_RENAMES[module]}.{kind}"] = value
        else:
            raise ValueError(f"CLIP vision weights: unexpected tensor {key!r}")
    for layer, parts in qkv.items():
        for kind, name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            try:
                # nn.MultiheadAttention packs [q; k; v] along the output dimension.
                out[f"transformer.resblocks.{layer}.attn.{name}"] = torch.cat(
                    [parts[f"{p}.{kind}"] for p in "qkv"]
                )
            except KeyError as err:
                raise ValueError(f"CLIP vision weights: layer {layer} lacks {err.args[0]}") from None
    return out


def load_clip_vision_weights(tower: VisionTower, hf_state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load HF CLIP vision weights into a (pruned) tower; returns the dropped open_clip keys (the last
    block and the final norm, which the penultimate-block features never use)."""
    converted = clip_vision_to_open_clip(hf_state)
    expected = tower.visual.state_dict()
    n_kept = len(tower.visual.transformer.resblocks)
    n_source = 1 + max(
        (int(m[1]) for k in converted if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))), default=-1
    )
    if n_source != n_kept + 1:
        raise ConfigError(
            f"the checkpoint's ViT has {n_source} blocks but vision config {tower.config.model_name!r} builds "
            f"{n_kept + 1} (of which the first {n_kept} are used)"
        )
    unused = re.compile(rf"^(transformer\.resblocks\.{n_kept}\.|ln_post\.)")
    dropped = sorted(k for k in converted if unused.match(k))
    for key in dropped:
        del converted[key]
    missing, unexpected = sorted(set(expected) - set(converted)), sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"CLIP vision weights do not fit the tower: missing {missing}, unexpected {unexpected}"
        )
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"CLIP vision weight {key}: checkpoint {tuple(value.shape)} vs tower {tuple(expected[key].shape)}"
            )
    tower.visual.load_state_dict(converted, strict=True)
    return dropped


def load_released_state_dict(
    model: DragonflyModel,
    state: Mapping[str, torch.Tensor],
    image_newline_id: int = RELEASED_IMAGE_NEWLINE_ID,
) -> ConversionReport:
    """Copy a released-layout state dict into ``model`` (built with ``load_weights=False``); the
    separator, when the model has one, is the LLM's embedding of ``image_newline_id``."""
    if model.config.projector != "linear":
        raise ConfigError("the released checkpoints have a linear projector; set projector: linear")
    groups: dict[str, dict[str, torch.Tensor]] = {name: {} for name in RELEASED_PREFIXES.values()}
    report = ConversionReport()
    for key, value in state.items():
        prefix = next((p for p in RELEASED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"released checkpoint: tensor {key!r} is outside {sorted(RELEASED_PREFIXES)}")
        groups[RELEASED_PREFIXES[prefix]][key.removeprefix(prefix)] = value

    report.dropped += [
        f"image_encoder.vision_model.{k}" for k in load_clip_vision_weights(model.vision, groups["vision"])
    ]

    projector = groups["projector"]
    if set(projector) != {"weight", "bias"}:
        raise ValueError(
            f"released checkpoint: vision_embed_tokens has {sorted(projector)}, expected weight and bias"
        )
    model.projector.proj.load_state_dict(projector, strict=True)

    llm_state = {k: v for k, v in groups["llm"].items() if not _IGNORED.search(k)}
    report.dropped += [f"language_model.{k}" for k in groups["llm"] if _IGNORED.search(k)]
    missing, unexpected = model.llm.load_state_dict(llm_state, strict=False)
    tied = {"lm_head.weight"} if model.llm.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"released checkpoint: language_model does not fit: missing {missing}, unexpected {unexpected}"
        )

    loaded = {f"projector.proj.{k}" for k in projector}
    if model.projector.separator is not None:
        embeddings = model.llm.get_input_embeddings().weight
        if not 0 <= image_newline_id < embeddings.shape[0]:
            raise ConfigError(
                f"image newline id {image_newline_id} is outside the LLM's vocabulary of {embeddings.shape[0]}"
            )
        with torch.no_grad():
            model.projector.separator.copy_(embeddings[image_newline_id])
        loaded.add("projector.separator")
    report.initialised = [
        n for n, _ in model.projector.named_parameters(prefix="projector") if n not in loaded
    ]
    return report


def load_safetensors_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory of ``*.safetensors`` shards (never pickles)."""
    shards = sorted(Path(directory).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = safetensors.torch.load_file(str(shard))
        if overlap := set(state) & set(part):
            raise ValueError(f"{shard.name} repeats tensors {sorted(overlap)[:5]}")
        state.update(part)
    return state


def released_config(hf_config: Mapping, image_token_id: int) -> DragonflyConfig:
    """Our config for a released checkpoint, from its ``config.json`` (which nests the Llama
    config as ``text_config``): ViT-L/14-336 with QuickGELU, a linear projector, paper tokens with
    one CLS and one separator (the image newline) per crop, as released: 2098 positions."""
    text_config = dict(hf_config.get("text_config") or {})
    if not text_config:
        raise ConfigError("released config.json has no text_config")
    text_config.setdefault("model_type", "llama")
    return DragonflyConfig(
        image_token_id=image_token_id,
        zoom=RELEASED_ZOOM,
        tokens=RELEASED_TOKENS,  # 2098 positions
        vision=VisionConfig(model_name="ViT-L-14-336", pretrained=None, quick_gelu=True),
        projector="linear",
        llm_name_or_path=None,
        llm_config=text_config,
    )


def convert_released_checkpoint(
    source: Mapping[str, torch.Tensor] | str | Path,
    config: DragonflyConfig,
    image_newline_id: int = RELEASED_IMAGE_NEWLINE_ID,
) -> DragonflyModel:
    """A released checkpoint (a state dict, or a directory of safetensors shards) -> our model."""
    state = source if isinstance(source, Mapping) else load_safetensors_dir(source)
    model = DragonflyModel(config, load_weights=False)
    report = load_released_state_dict(model, state, image_newline_id)
    log.info(
        "converted released checkpoint: dropped %s; newly initialised %s", report.dropped, report.initialised
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragonfly.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "src", type=Path, help="directory with the released *.safetensors shards and config.json"
    )
    parser.add_argument("dst", type=Path, help="output directory (config.json + model.safetensors)")
    parser.add_argument(
        "--config", type=Path, help="our DragonflyConfig JSON (default: derived from SRC/config.json)"
    )
    parser.add_argument(
        "--image-token-id",
        type=int,
        help="id of <image> in the tokenizer (without --config; default: from SRC's tokenizer)",
    )
    parser.add_argument(
        "--image-newline-id",
        type=int,
        help=f"token whose embedding the released model puts after each crop (default: the id of "
        f"{RELEASED_IMAGE_NEWLINE_TOKEN} in SRC's tokenizer, else {RELEASED_IMAGE_NEWLINE_ID})",
    )
    args = parser.parse_args(argv)
    config = DragonflyConfig.from_json(args.config.read_text()) if args.config else None
    processor = None
    if (args.src / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        from dragonfly.processor import DragonflyProcessor

        zoom, tokens = (config.zoom, config.tokens) if config else (RELEASED_ZOOM, RELEASED_TOKENS)
        processor = DragonflyProcessor(
            AutoTokenizer.from_pretrained(args.src), zoom, tokens, chat_template="released"
        )
    image_token_id = (
        args.image_token_id if args.image_token_id is not None else getattr(processor, "image_token_id", None)
    )
    if config is None:
        if image_token_id is None:
            parser.error("--image-token-id is required without --config and without a tokenizer in SRC")
        config = released_config(json.loads((args.src / "config.json").read_text()), image_token_id)
    if processor is not None and processor.image_token_id != config.image_token_id:
        parser.error(
            f"<image> is id {processor.image_token_id} in SRC's tokenizer but {config.image_token_id} in the config"
        )
    newline_id = args.image_newline_id
    if newline_id is None:
        in_tokenizer = (
            processor.tokenizer.get_vocab().get(RELEASED_IMAGE_NEWLINE_TOKEN) if processor else None
        )
        newline_id = RELEASED_IMAGE_NEWLINE_ID if in_tokenizer is None else in_tokenizer
    model = DragonflyModel(config, load_weights=False)
    report = load_released_state_dict(model, load_safetensors_dir(args.src), newline_id)
    model.save_pretrained(args.dst)
    if processor is not None:
        processor.save_pretrained(args.dst)
    print(
        json.dumps(
            {
                "dst": str(args.dst),
                "processor": processor is not None,
                "dropped": report.dropped,
                "initialised": report.initialised,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ConversionReport",
    "RELEASED_IMAGE_NEWLINE_ID",
    "RELEASED_IMAGE_NEWLINE_TOKEN",
    "clip_vision_to_open_clip",
    "load_clip_vision_weights",
    "load_released_state_dict",
    "load_safetensors_dir",
    "released_config",
    "convert_released_checkpoint",
]
