"""The Dragonfly vision-language model: ViT -> pool -> project -> splice into a causal LLM.

One image (41 crops of 336 px with the paper's zoom levels) becomes one *image block* of
``layout.positions`` rows of LLM embeddings, for each crop in tile order::

    [CLS]? pooled patch tokens [SEP]?

``layout = image_token_layout(config.zoom, config.tokens)`` is the same object the processor used to
reserve ``image_token_id`` at exactly those positions, so ``forward`` computes every image block of
the batch and writes them all into ``inputs_embeds`` with one ``masked_scatter``. Text-only samples
have no such positions and share batches with image samples.

Shapes in comments: B batch, T sequence, I images in the batch, K crops per image (n_tiles),
R crop side, L = G*G patch tokens per crop, C vision width, D LLM width, P positions per image block.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from dragonfly.budget import image_token_layout
from dragonfly.config import ConfigError, TokenConfig, ZoomConfig, config_from_dict
from dragonfly.pooling import PerceiverConfig, PerceiverResampler, mean_pool
from dragonfly.vision import VisionConfig, VisionTower
from dragonfly.zoom import make_crops, stack_crops

if TYPE_CHECKING:
    from PIL import Image

    from dragonfly.processor import DragonflyProcessor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRODUCTION_LLM = "meta-llama/Llama-3.1-8B-Instruct"

# A 28 px ViT with 7 px patches: a 4x4 token grid, so 16 / 4 / 1 tokens per crop are strides 1 / 2 / 4.
TINY_VIT_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "patch_size": 7, "width": 32, "layers": 3, "head_width": 16},
    # open_clip always builds a text tower; the model drops it right away.
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
TINY_TOKENS = TokenConfig(tokens=(("low", 16), ("medium", 4), ("high", 1)))


def tiny_llama_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class DragonflyConfig:
    """Everything needed to build the model; JSON round trip, unknown keys rejected.

    The LLM is either a Hugging Face id/path (``llm_name_or_path``: weights load from there) or an
    inline ``llm_config`` dict with a ``model_type`` (architecture only: random weights, or weights
    from ``from_pretrained``). ``save_pretrained`` always writes the inline form, so reloading never
    needs the network. Nested sections may be given as dicts (YAML recipes).
    """

    image_token_id: int
    zoom: ZoomConfig = ZoomConfig()
    tokens: TokenConfig = TokenConfig()
    vision: VisionConfig = VisionConfig()
    projector: Literal["linear", "mlp"] = "linear"
    pooling: Literal["mean", "perceiver"] = "mean"
    perceiver: PerceiverConfig = PerceiverConfig()
    llm_name_or_path: str | None = PRODUCTION_LLM
    llm_config: dict[str, Any] | None = None
    attn_implementation: str = "sdpa"  # "flash_attention_2" on GPUs, by config
    llm_gradient_checkpointing: bool = False  # the ViT's is vision.gradient_checkpointing
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype of every parameter

    def __post_init__(self):
        for name, cls in (
            ("zoom", ZoomConfig),
            ("tokens", TokenConfig),
            ("vision", VisionConfig),
            ("perceiver", PerceiverConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, cls.from_dict(value))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")
        if not isinstance(self.image_token_id, int) or self.image_token_id < 0:
            raise ConfigError(f"image_token_id must be a non-negative int, got {self.image_token_id!r}")
        if self.projector not in ("linear", "mlp"):
            raise ConfigError(f"projector must be 'linear' or 'mlp', got {self.projector!r}")
        if self.pooling not in ("mean", "perceiver"):
            raise ConfigError(f"pooling must be 'mean' or 'perceiver', got {self.pooling!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.llm_config is None and not self.llm_name_or_path:
            raise ConfigError("set llm_name_or_path (a Hugging Face id or path) or an inline llm_config")
        if self.llm_config is not None and "model_type" not in self.llm_config:
            raise ConfigError("llm_config needs a 'model_type' (e.g. 'llama')")
        for level in self.zoom.levels:
            self.tokens.for_level(level)  # every enabled level needs a token count

    @property
    def layout(self):
        return image_token_layout(self.zoom, self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_token_id": self.image_token_id,
            "zoom": self.zoom.to_dict(),
            "tokens": self.tokens.to_dict(),
            "vision": self.vision.to_dict(),
            "projector": self.projector,
            "pooling": self.pooling,
            "perceiver": self.perceiver.to_dict(),
            "llm_name_or_path": self.llm_name_or_path,
            "llm_config": self.llm_config,
            "attn_implementation": self.attn_implementation,
            "llm_gradient_checkpointing": self.llm_gradient_checkpointing,
            "dtype": self.dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DragonflyConfig:
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> DragonflyConfig:
        return cls.from_dict(json.loads(text))

    @classmethod
    def tiny(cls, vocab_size: int, image_token_id: int, **overrides: Any) -> DragonflyConfig:
        """A model that trains in seconds on a CPU: 28 px crops, a 2-block ViT, a 2-layer Llama.

        ``overrides`` replace any field (nested sections as dataclasses or dicts)."""
        fields: dict[str, Any] = {
            "image_token_id": image_token_id,
            "zoom": ZoomConfig(resolution=28),
            "tokens": TINY_TOKENS,
            "vision": VisionConfig(
                model_name="dragonfly-tiny-vit", pretrained=None, model_config=TINY_VIT_CONFIG
            ),
            "perceiver": PerceiverConfig(depth=3, heads=2, head_dim=16),
            "llm_name_or_path": None,
            "llm_config": tiny_llama_config(vocab_size),
        }
        fields.update(overrides)
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# Projector: vision tokens of every crop -> image blocks in the LLM's embedding space


class ImageProjector(nn.Module):
    """Per-crop (cls, patch tokens) -> (I, P, D) image blocks: reduce, project, add CLS/SEP rows.

    Order of reduce and project: with the linear projector mean pooling runs first. Both are linear,
    so this equals the released project-then-pool order, at 1/stride^2 of the projector's FLOPs
    (about 15x less over Dragonfly's 41 crops). The MLP is not linear, so it projects first, as in
    LLaVA. The Perceiver Resampler works in the vision width, before the projector.

    The separator is a learned D-vector (like LLaVA-NeXT's ``image_newline``) owned here, so a
    stage that trains only the projector trains it too.
    """

    def __init__(self, config: DragonflyConfig, vision_width: int, grid_side: int, llm_width: int):
        super().__init__()
        self.kind = config.projector
        self.llm_width = llm_width
        self.keep_cls = config.tokens.keep_cls
        self.tiles_per_level = config.zoom.tiles_per_level()  # tile order: low, medium, high
        self.strides = {lv: config.tokens.pool_stride(lv, grid_side) for lv in self.tiles_per_level}
        if self.kind == "linear":
            self.proj = nn.Linear(vision_width, llm_width)
        else:
            self.proj = nn.Sequential(
                nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width)
            )
        self.resamplers = nn.ModuleDict()
        if config.pooling == "perceiver":
            for level, stride in self.strides.items():
                if stride > 1:  # a level that keeps every token needs no reducer
                    n_latents = config.tokens.for_level(level)
                    self.resamplers[level] = PerceiverResampler(vision_width, n_latents, config.perceiver)
        self.separator = (
            nn.Parameter(torch.randn(llm_width) * llm_width**-0.5) if config.tokens.separator else None
        )

    def reduce_and_project(self, patches: torch.Tensor, level: str) -> torch.Tensor:
        """patches (N, L, C) of crops of one level -> (N, tokens[level], D)."""
        stride = self.strides[level]
        if level in self.resamplers:
            return self.proj(self.resamplers[level](patches))
        if self.kind == "linear":
            return self.proj(mean_pool(patches, stride))
        return mean_pool(self.proj(patches), stride)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor, n_images: int) -> torch.Tensor:
        # cls (I*K, C), patches (I*K, L, C); the K crops of each image are contiguous, in tile order
        d = self.llm_width
        patches = patches.view(n_images, -1, *patches.shape[1:])  # (I, K, L, C)
        cls_rows = self.proj(cls).view(n_images, -1, 1, d) if self.keep_cls else None  # (I, K, 1, D)
        blocks, start = [], 0
        for level, k in self.tiles_per_level.items():
            crops = patches[:, start : start + k].flatten(0, 1)  # (I*k, L, C)
            tokens = self.reduce_and_project(crops, level).view(n_images, k, -1, d)  # (I, k, m, D)
            rows = [tokens] if cls_rows is None else [cls_rows[:, start : start + k], tokens]
            if self.separator is not None:
                rows.append(self.separator.view(1, 1, 1, d).expand(n_images, k, 1, d))
            blocks.append(torch.cat(rows, dim=2).flatten(1, 2))  # (I, k * (1? + m + 1?), D)
            start += k
        return torch.cat(blocks, dim=1)  # (I, P, D)


# ---------------------------------------------------------------------------------------------
# The model


def _build_llm(config: DragonflyConfig, load_weights: bool) -> nn.Module:
    dtype = DTYPES[config.dtype]
    if config.llm_config is not None:
        settings = dict(config.llm_config)
        llm_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    elif load_weights:
        return AutoModelForCausalLM.from_pretrained(
            config.llm_name_or_path, dtype=dtype, attn_implementation=config.attn_implementation
        )
    else:
        llm_config = AutoConfig.from_pretrained(config.llm_name_or_path)
    return AutoModelForCausalLM.from_config(
        llm_config, dtype=dtype, attn_implementation=config.attn_implementation
    )


class DragonflyModel(nn.Module):
    """``vision`` (open_clip ViT), ``projector`` (pooling, projector, separator), ``llm`` (HF causal LM)."""

    def __init__(self, config: DragonflyConfig, load_weights: bool = True):
        """``load_weights=False`` builds every part with random weights and no downloads."""
        super().__init__()
        self.config = config
        self.layout = config.layout
        self.vision = VisionTower(config.vision, load_weights=load_weights)
        if self.vision.image_size != config.zoom.resolution:
            raise ConfigError(
                f"zoom.resolution is {config.zoom.resolution} but the vision tower takes {self.vision.image_size} px crops"
            )
        self.llm = _build_llm(config, load_weights)
        if config.llm_gradient_checkpointing:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        llm_width = self.llm.get_input_embeddings().embedding_dim
        self.projector = ImageProjector(config, self.vision.width, self.vision.grid_side, llm_width)
        # Parameters only, as DeepSpeed casts: buffers keep their dtype. The LLM's rotary frequencies
        # must stay float32 (transformers builds them so); rounded to bf16, Llama-3.1-8B's rotate the
        # text after an image block (position >= 2098) by up to 3.7 rad more than trained.
        for param in self.parameters():
            param.data = param.data.to(DTYPES[config.dtype])

    # -- images -> embeddings --------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: uint8 (I, K, 3, R, R) -> image blocks (I, P, D)."""
        if pixels.ndim != 5 or pixels.shape[1] != self.layout.n_crops:
            raise ValueError(
                f"pixels must be (images, {self.layout.n_crops} crops, 3, R, R) for zoom levels "
                f"{self.config.zoom.levels}, got {tuple(pixels.shape)}"
            )
        cls, patches = self.vision(pixels.flatten(0, 1))  # (I*K, C), (I*K, L, C)
        blocks = self.projector(cls, patches, n_images=pixels.shape[0])  # (I, P, D)
        assert blocks.shape[1] == self.layout.positions, (blocks.shape, self.layout.positions)
        return blocks

    def _dummy_image_term(self) -> torch.Tensor:
        """A zero that depends on every vision/projector parameter (one all-zero image).

        A batch without images still runs the whole image path in ``forward`` (training and
        validation alike), because under DeepSpeed ZeRO-3 every rank must run the same modules in
        the same order (parameters are gathered collectively), and every trainable parameter then
        gets a gradient (zero) on every rank. ``generate`` runs on one process and skips it.
        The zero joins the input embeddings, not the loss, so the order of use is image path,
        embeddings, LLM on every rank.
        """
        r = self.config.zoom.resolution
        input_device = next(self.projector.parameters()).device
        zeros = torch.zeros(1, self.layout.n_crops, 3, r, r, dtype=torch.uint8, device=input_device)
        return self.encode_images(zeros).sum() * 0.0

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        always_run_image_path: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T), pixels uint8 (I, K, 3, R, R) -> inputs_embeds (B, T, D).

        The processor put ``image_token_id`` at every position of each image's block; the blocks of
        the batch's I images (in batch order) fill those positions row-major in one masked scatter.
        With ``always_run_image_path`` a batch without images runs the image path on one all-zero
        image and adds its zero to the embeddings (see ``_dummy_image_term``).
        """
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        n_positions = int(image_mask.sum())
        n_images = 0 if pixels is None else pixels.shape[0]
        if has_image is not None and int(has_image.sum()) != n_images:
            raise ValueError(
                f"has_image marks {int(has_image.sum())} samples with an image but pixels hold {n_images}"
            )
        if n_positions != n_images * self.layout.positions:
            raise ValueError(
                f"input_ids hold {n_positions} image positions (id {self.config.image_token_id}) but {n_images} "
                f"images x {self.layout.positions} positions per image block = {n_images * self.layout.positions}: "
                "the processor's and the model's zoom/token configs disagree, or an image block was truncated"
            )
        # The image path runs before the token embedding on every rank: ZeRO-3 gathers each
        # module's parameters collectively, so all ranks must use the modules in one order.
        if n_images:
            blocks = self.encode_images(pixels)  # (I, P, D)
        elif always_run_image_path:
            zero = self._dummy_image_term()  # () == 0
        # The image id may lie outside the LLM's vocabulary; those rows are overwritten anyway.
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        if n_images:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), blocks.to(embeds.dtype))
        elif always_run_image_path:
            embeds = embeds + zero.to(embeds.dtype)
        return embeds

    # -- training forward ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
    ):
        """The collate dict's keys in, a Hugging Face ``CausalLMOutputWithPast`` out.

        With ``labels`` (-100 = not supervised) ``.loss`` is the mean shifted cross-entropy."""
        embeds = self.embed_inputs(input_ids, pixels, has_image, always_run_image_path=True)  # (B, T, D)
        position_ids = None
        if attention_mask is not None:
            # Positions count real tokens only, so left- and right-padded batches agree.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=False,
        )

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Batched generation from left-padded prompts -> new token ids (B, <= max_new_tokens).

        Images are encoded once, into the prefill's ``inputs_embeds``; later steps use the KV cache.
        Greedy unless ``do_sample=True`` is passed."""
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts (attention_mask[:, -1] must be all 1)")
        embeds = self.embed_inputs(input_ids, pixels, has_image)
        generate_kwargs.setdefault("do_sample", False)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            **generate_kwargs,
        )

    @torch.no_grad()
    def generate_text(
        self,
        processor: DragonflyProcessor,
        images: Sequence[bytes | Image.Image | None],
        messages_list: Sequence[list[dict]],
        max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answers for a batch of conversations, each with an image (bytes or PIL) or ``None``.

        Each conversation ends with a user turn; crops come from ``dragonfly.zoom.make_crops`` and
        prompts from ``processor.encode_prompt``, left-padded into one batch."""
        if len(images) != len(messages_list):
            raise ValueError(f"{len(images)} images for {len(messages_list)} conversations")
        if processor.layout != self.layout:
            raise ValueError(f"processor layout {processor.layout} differs from the model's {self.layout}")
        device = self.llm.get_input_embeddings().weight.device
        prompts = [
            processor.encode_prompt(messages, has_image=image is not None, record_id=f"<prompt {i}>")
            for i, (image, messages) in enumerate(zip(images, messages_list, strict=True))
        ]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), processor.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(prompt) :] = torch.from_numpy(prompt.astype("int64"))
            attention_mask[row, width - len(prompt) :] = 1
        crops = [
            make_crops(image, self.config.zoom, source=f"<image {i}>").pixels
            for i, image in enumerate(images)
            if image is not None
        ]
        pixels = stack_crops(crops).to(device) if crops else None  # (I, K, 3, R, R) uint8
        generate_kwargs.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
        new_tokens = self.generate(
            input_ids.to(device),
            attention_mask.to(device),
            pixels=pixels,
            has_image=torch.tensor([image is not None for image in images]),
            max_new_tokens=max_new_tokens,
            pad_token_id=processor.pad_token_id,
            **generate_kwargs,
        )
        return [processor.decode(row, skip_special_tokens=True) for row in new_tokens]

    # -- save / load -----------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``config.json`` + ``model.safetensors``. The saved config rebuilds the model offline:
        the LLM as an inline config, the vision tower without a weight source."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(
            self.config,
            vision=self.vision.rebuild_config(),
            llm_config=self.llm.config.to_dict(),
        )
        (directory / CONFIG_NAME).write_text(config.to_json())
        safetensors.torch.save_file(
            _unshared_state_dict(self), str(directory / WEIGHTS_NAME), metadata={"format": "pt"}
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> DragonflyModel:
        directory = Path(directory)
        config = DragonflyConfig.from_json((directory / CONFIG_NAME).read_text())
        # Every parameter is overwritten below, so none is initialised first: a random init of an
        # 8B model costs minutes of CPU (a 1.1B one ~15 s on the dev box). no_init_weights also
        # skips transformers' init_weights, which is where the LLM ties its embeddings.
        with no_init_weights(), _without_open_clip_random_init_warning():
            model = cls(config, load_weights=False)
        model.llm.tie_weights()
        # strict: a missing or unexpected tensor is an error, not a silently random weight.
        safetensors.torch.load_model(model, str(directory / WEIGHTS_NAME), strict=True, device=str(device))
        return model.to(device)


@contextmanager
def _without_open_clip_random_init_warning() -> Iterator[None]:
    """open_clip warns "Model initialized randomly" when it builds a tower without weights; in
    ``from_pretrained`` the weights come right after, and the warning would tell the user otherwise."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _unshared_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as standalone contiguous CPU copies, one name per tied tensor.

    Tied weights (input/output embeddings) are one tensor under two names: keep the first name;
    ``load_model`` restores the other from it. Storage sharing alone cannot decide this, because
    under DeepSpeed ZeRO-1/2 every parameter is a view into one flat buffer, which is what
    ``safetensors.torch.save_model`` trips over.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]] = set()
    for name, tensor in sorted(model.state_dict().items()):
        view = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and view in seen:
            continue
        seen.add(view)
        tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


# ---------------------------------------------------------------------------------------------
# Freeze plans and optimizer parameter groups

FREEZE_PLANS: dict[str, tuple[str, ...]] = {
    "stage1": ("projector",),  # LLaVA-style alignment: projector (and separator / resampler) only
    "stage2": ("vision", "projector", "llm"),  # everything
    "med_stage1": ("vision", "projector"),  # biomedical stage 1: adapt the ViT too
}
# Learned vectors that act like embeddings rather than weight matrices (latents are 2-D).
NO_DECAY_SUFFIXES = ("separator", "latents")


def apply_freeze_plan(model: nn.Module, plan: str | Sequence[str]) -> list[str]:
    """Train exactly the parameters under the plan's module prefixes; returns their names.

    ``plan`` is a name in ``FREEZE_PLANS`` or a list of prefixes such as
    ``["projector", "llm.model.embed_tokens"]``."""
    if isinstance(plan, str):
        if plan not in FREEZE_PLANS:
            raise ConfigError(
                f"unknown freeze plan {plan!r}; choose from {sorted(FREEZE_PLANS)} or a list of prefixes"
            )
        prefixes = FREEZE_PLANS[plan]
    else:
        prefixes = tuple(plan)
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            raise ConfigError(f"freeze plan prefix {prefix!r} matches no parameter")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(_under(name, prefix) for prefix in prefixes))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split for AdamW: no decay on biases, norms (any 1-D tensor), the
    separator and resampler latents."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_SUFFIXES
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


__all__ = [
    "DragonflyConfig",
    "DragonflyModel",
    "ImageProjector",
    "FREEZE_PLANS",
    "apply_freeze_plan",
    "param_groups",
    "tiny_llama_config",
    "TINY_VIT_CONFIG",
    "TINY_TOKENS",
]
