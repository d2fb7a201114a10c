"""dragonfly.model and dragonfly.pooling: layout, pooling, splice, freeze plans, save/load, generate,
and a tiny model overfitting real photos."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from dragonfly.budget import DRAGONFLY_PRESETS, image_token_layout
from dragonfly.config import PAPER_TOKEN_CHOICES, ConfigError, TokenConfig, ZoomConfig
from dragonfly.model import (
    TINY_TOKENS,
    DragonflyConfig,
    DragonflyModel,
    ImageProjector,
    apply_freeze_plan,
    param_groups,
    tiny_llama_config,
)
from dragonfly.pooling import PerceiverConfig, PerceiverResampler, mean_pool

VOCAB, IMAGE_ID, PAD = 96, 95, 0
R = 28


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID)).eval()


def random_pixels(n_images: int, n_crops: int = 41, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_images, n_crops, 3, R, R), dtype=torch.uint8, generator=generator)


def make_batch(
    samples: list[tuple[list[int], bool, list[int]]], positions: int, left_pad: bool = False
) -> dict:
    """samples: (text before the image, has an image, text after) -> a collate-style dict."""
    rows = [
        before + [IMAGE_ID] * (positions if has_image else 0) + after for before, has_image, after in samples
    ]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left_pad else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    labels = input_ids.masked_fill((input_ids == IMAGE_ID) | (attention_mask == 0), -100)
    has_image = torch.tensor([s[1] for s in samples])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "has_image": has_image,
    }


# ---------------------------------------------------------------------------------------------
# Pooling


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 6, 8])
def test_mean_pool_equals_avg_pool2d_on_the_24x24_grid(stride):
    tokens = torch.randn(3, 576, 5)
    pooled = mean_pool(tokens, stride)
    grid = tokens.view(3, 24, 24, 5).permute(0, 3, 1, 2)  # (N, C, 24, 24), row-major token order
    reference = F.avg_pool2d(grid, stride).permute(0, 2, 3, 1).reshape(3, -1, 5)
    assert pooled.shape[1] == 576 // stride**2 and pooled.shape[1] in PAPER_TOKEN_CHOICES
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    if stride == 2:  # first pooled token = mean of the top-left 2x2 window
        torch.testing.assert_close(pooled[:, 0], tokens[:, [0, 1, 24, 25]].mean(1))


def test_mean_pool_refuses_a_stride_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match="stride 5"):
        mean_pool(torch.randn(1, 576, 4), 5)


def projector_config(tokens: TokenConfig, levels=("low", "medium", "high"), **overrides) -> DragonflyConfig:
    return DragonflyConfig(
        image_token_id=IMAGE_ID,
        zoom=ZoomConfig(levels=levels),
        tokens=tokens,
        llm_name_or_path=None,
        llm_config=tiny_llama_config(VOCAB),
        **overrides,
    )


def test_linear_projector_pools_before_projecting_and_that_equals_project_then_pool():
    torch.manual_seed(0)
    projector = ImageProjector(projector_config(DRAGONFLY_PRESETS["dragonfly"]), 8, 24, 16)
    patches = torch.randn(6, 576, 8)
    for level, stride in (("low", 1), ("medium", 4), ("high", 4)):
        ours = projector.reduce_and_project(patches, level)
        released_order = mean_pool(projector.proj(patches), stride)
        torch.testing.assert_close(ours, released_order, rtol=1e-5, atol=1e-5)


def test_mlp_projector_projects_before_pooling():
    torch.manual_seed(0)
    projector = ImageProjector(projector_config(DRAGONFLY_PRESETS["dragonfly"], projector="mlp"), 8, 24, 16)
    patches = torch.randn(4, 576, 8)
    out = projector.reduce_and_project(patches, "high")
    torch.testing.assert_close(out, mean_pool(projector.proj(patches), 4))
    assert not torch.allclose(out, projector.proj(mean_pool(patches, 4)), atol=1e-4)  # order matters here


LEVEL_SETS = [("low",), ("medium",), ("high",), ("low", "medium"), ("low", "high"), ("low", "medium", "high")]


@pytest.mark.parametrize("preset", sorted(DRAGONFLY_PRESETS))
@pytest.mark.parametrize("levels", LEVEL_SETS, ids="+".join)
def test_image_block_follows_the_budget_layout(preset, levels):
    for keep_cls, separator in itertools.product([True, False], repeat=2):
        tokens = dataclasses.replace(DRAGONFLY_PRESETS[preset], keep_cls=keep_cls, separator=separator)
        check_block_layout(projector_config(tokens, levels))


def check_block_layout(config: DragonflyConfig) -> None:
    """Every row of the image block is where ``image_token_layout`` says: CLS, pooled tokens, SEP."""
    layout = image_token_layout(config.zoom, config.tokens)
    keep_cls = config.tokens.keep_cls
    torch.manual_seed(0)
    projector = ImageProjector(config, 8, 24, 16)
    n_images, k = 2, layout.n_crops
    cls, patches = torch.randn(n_images * k, 8), torch.randn(n_images * k, 576, 8)
    strides = {level: config.tokens.pool_stride(level, 24) for level in config.zoom.levels}
    with torch.no_grad():
        blocks = projector(cls, patches, n_images)
        assert blocks.shape == (n_images, layout.positions, 16)
        for image, crop in itertools.product(range(n_images), range(k)):
            (start, stop), level, i = layout.crop_spans()[crop], layout.crop_levels[crop], image * k + crop
            if keep_cls:
                torch.testing.assert_close(blocks[image, start], projector.proj(cls[i]))
            expected = projector.proj(mean_pool(patches[i : i + 1], strides[level]))[0]
            torch.testing.assert_close(
                blocks[image, start + int(keep_cls) : stop], expected, rtol=1e-5, atol=1e-5
            )
            if config.tokens.separator:
                assert torch.equal(blocks[image, stop], projector.separator)


# ---------------------------------------------------------------------------------------------
# Perceiver Resampler


def test_perceiver_resampler_shapes_and_gradients():
    torch.manual_seed(0)
    resampler = PerceiverResampler(32, n_latents=36, config=PerceiverConfig(depth=3, heads=2, head_dim=16))
    tokens = torch.randn(5, 576, 32, requires_grad=True)
    out = resampler(tokens)
    assert out.shape == (5, 36, 32)
    out.square().mean().backward()
    assert tokens.grad.abs().sum() > 0
    for name, param in resampler.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert len(resampler.blocks) == 3


def test_perceiver_model_keeps_the_layout_and_trains_in_stage1():
    torch.manual_seed(0)
    config = DragonflyConfig.tiny(VOCAB, IMAGE_ID, pooling="perceiver")
    model = DragonflyModel(config)
    # Low keeps all 16 tokens (no reducer); medium and high get one resampler each.
    assert sorted(model.projector.resamplers) == ["high", "medium"]
    assert model.projector.resamplers["medium"].latents.shape[0] == 4
    trainable = apply_freeze_plan(model, "stage1")
    batch = make_batch([([1, 2], True, [3, 4, 5])], config.layout.positions)
    model.train()(**batch, pixels=random_pixels(1)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    assert any(".resamplers.high." in n for n in with_grad)


# ---------------------------------------------------------------------------------------------
# Splice into the LLM


def test_image_blocks_land_on_the_image_positions_in_batch_order(model):
    positions = model.layout.positions
    batch = make_batch([([1, 2], True, [3]), ([4, 5, 6, 7], False, []), ([8], True, [9, 10])], positions)
    pixels = random_pixels(2)
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], pixels, batch["has_image"])
        blocks = model.encode_images(pixels)
        table = model.llm.get_input_embeddings().weight
    assert torch.equal(embeds[0, 2 : 2 + positions], blocks[0])
    assert torch.equal(embeds[2, 1 : 1 + positions], blocks[1])
    assert torch.equal(embeds[1, :4], table[[4, 5, 6, 7]])  # the text-only sample is plain text
    assert torch.equal(embeds[0, :2], table[[1, 2]])


def test_text_only_sample_in_an_image_batch_is_unaffected(model):
    positions = model.layout.positions
    text = ([4, 5, 6, 7, 8], False, [])
    mixed = make_batch([([1, 2], True, [3]), text], positions)
    alone = make_batch([text], positions)
    with torch.no_grad():
        logits_mixed = model(**mixed, pixels=random_pixels(1)).logits
        logits_alone = model(**alone).logits
    torch.testing.assert_close(logits_mixed[1, :5], logits_alone[0, :5], rtol=1e-5, atol=1e-5)


def test_image_position_count_mismatch_is_a_clear_error(model):
    positions = model.layout.positions
    batch = make_batch([([1, 2], True, [3])], positions)
    ids = batch["input_ids"][:, :-2]  # one image position short (and the trailing text)
    with pytest.raises(ValueError, match=f"{positions - 1} image positions"):
        model.embed_inputs(ids, random_pixels(1))
    with pytest.raises(ValueError, match="has_image marks 0"):
        model.embed_inputs(batch["input_ids"], random_pixels(1), torch.tensor([False]))
    with pytest.raises(ValueError, match="41 crops"):
        model.encode_images(random_pixels(1, n_crops=5))


# ---------------------------------------------------------------------------------------------
# Freeze plans and optimizer groups


@pytest.mark.parametrize(
    "plan,prefixes",
    [
        ("stage1", ("projector",)),
        ("stage2", ("vision", "projector", "llm")),
        ("med_stage1", ("vision", "projector")),
        (["projector", "llm.model.embed_tokens"], ("projector", "llm.model.embed_tokens")),
    ],
)
def test_gradients_flow_only_into_what_the_plan_trains(plan, prefixes):
    torch.manual_seed(0)
    config = DragonflyConfig.tiny(VOCAB, IMAGE_ID)
    model = DragonflyModel(config).train()
    trainable = set(apply_freeze_plan(model, plan))
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    batch = make_batch([([1, 2], True, [3, 4]), ([5, 6, 7], False, [])], config.layout.positions)
    model(**batch, pixels=random_pixels(1)).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable


def test_text_only_training_batch_still_gives_every_trainable_parameter_a_gradient():
    # The ZeRO-3 rule: every rank runs the vision path even when its batch has no image.
    torch.manual_seed(0)
    model = DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID)).train()
    trainable = set(apply_freeze_plan(model, "stage2"))
    batch = make_batch([([5, 6, 7, 8], False, [])], 0)
    out = model(**batch)
    with torch.no_grad():
        plain = model.llm(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert out.loss.item() == pytest.approx(plain.item(), abs=1e-6)
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert model.vision.visual.conv1.weight.grad.abs().sum() == 0


def module_call_order(model: DragonflyModel, batch: dict, pixels: torch.Tensor | None) -> list[str]:
    """Names of the parameter-owning modules in the order the forward first uses them."""
    order: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, module in model.named_modules()
        if any(True for _ in module.parameters(recurse=False))
    ]
    try:
        with torch.no_grad():
            model(**batch, pixels=pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def test_image_and_text_only_batches_use_the_modules_in_the_same_order(model):
    # ZeRO-3 gathers each module's parameters with a collective: ranks holding an image batch and
    # ranks holding a text-only batch must ask for the same modules in the same order, or hang.
    positions = model.layout.positions
    with_image = module_call_order(model, make_batch([([1, 2], True, [3])], positions), random_pixels(1))
    text_only = module_call_order(model, make_batch([([5, 6, 7, 8], False, [])], positions), None)
    assert with_image == text_only
    first_projector = next(i for i, name in enumerate(with_image) if name.startswith("projector"))
    assert with_image[0].startswith("vision")
    assert with_image.index("llm.model.embed_tokens") > first_projector


def test_unknown_freeze_plans_are_refused(model):
    with pytest.raises(ConfigError, match="unknown freeze plan"):
        apply_freeze_plan(model, "stage3")
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_freeze_plan(model, ["projector", "llm.model.embed"])


def test_param_groups_never_decay_norms_biases_separator_or_latents():
    model = DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID, pooling="perceiver"))
    apply_freeze_plan(model, "stage2")
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decayed | not_decayed == {n for n, _ in model.named_parameters()}
    assert "projector.separator" in not_decayed and "projector.resamplers.high.latents" in not_decayed
    assert "llm.model.norm.weight" in not_decayed and "projector.proj.bias" in not_decayed
    assert "vision.visual.transformer.resblocks.0.ln_1.weight" in not_decayed
    assert "projector.proj.weight" in decayed and "llm.model.layers.0.mlp.up_proj.weight" in decayed
    apply_freeze_plan(model, "stage1")
    assert all(names[id(p)].startswith("projector.") for g in param_groups(model, 0.1) for p in g["params"])


# ---------------------------------------------------------------------------------------------
# Config, save / load


def test_config_json_round_trip_and_unknown_keys():
    config = DragonflyConfig.tiny(VOCAB, IMAGE_ID, pooling="perceiver", projector="mlp")
    assert DragonflyConfig.from_json(config.to_json()) == config
    data = json.loads(config.to_json())
    data["vision"]["patch"] = 14
    with pytest.raises(ConfigError, match="VisionConfig: unknown keys"):
        DragonflyConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown keys"):
        DragonflyConfig.from_dict({**json.loads(config.to_json()), "lora": True})
    with pytest.raises(ConfigError, match="projector"):
        DragonflyConfig.tiny(VOCAB, IMAGE_ID, projector="conv")
    with pytest.raises(ConfigError, match="resolution"):
        DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID, zoom={"resolution": 56}))


def seeded_tiny_model(tie_word_embeddings: bool) -> DragonflyModel:
    torch.manual_seed(0)
    llm_config = {**tiny_llama_config(VOCAB), "tie_word_embeddings": tie_word_embeddings}
    return DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID, llm_config=llm_config)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, tie):
    model = seeded_tiny_model(tie)
    config = model.config
    model.save_pretrained(tmp_path)
    loaded = DragonflyModel.from_pretrained(tmp_path).eval()
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, value in original.items():
        assert value.dtype == restored[name].dtype and torch.equal(value, restored[name]), name
    # Buffers that are not saved (rotary frequencies) are rebuilt by the modules themselves.
    original_buffers, restored_buffers = dict(model.named_buffers()), dict(loaded.named_buffers())
    assert original_buffers.keys() == restored_buffers.keys()
    for name, value in original_buffers.items():
        assert torch.equal(value, restored_buffers[name]), name
    assert loaded.llm.get_output_embeddings().weight is loaded.llm.get_input_embeddings().weight or not tie
    batch = make_batch([([1, 2], True, [3])], config.layout.positions)
    with torch.no_grad():
        assert torch.equal(
            model(**batch, pixels=random_pixels(1)).logits, loaded(**batch, pixels=random_pixels(1)).logits
        )


def test_from_pretrained_skips_random_init_and_its_warning(tmp_path, monkeypatch, caplog):
    """Loading overwrites every weight, so nothing is initialised first (minutes for an 8B model),
    and open_clip's "initialized randomly" warning, false there, is not shown."""
    seeded_tiny_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    config = DragonflyConfig.from_json((tmp_path / "config.json").read_text())
    calls = []

    def counting(name):
        original = getattr(torch.nn.init, name)
        return lambda *args, **kwargs: calls.append(name) or original(*args, **kwargs)

    for name in ("normal_", "kaiming_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, counting(name))

    def build(make) -> str:
        calls.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            make()
        return caplog.text

    # A random build, before and after a load: the probes see it, and the warning is shown.
    assert "initialized randomly" in build(lambda: DragonflyModel(config, load_weights=False)) and calls
    assert "initialized randomly" not in build(lambda: DragonflyModel.from_pretrained(tmp_path))
    assert calls == []
    assert "initialized randomly" in build(lambda: DragonflyModel(config, load_weights=False)) and calls


@pytest.mark.parametrize("tie", [False, True])
def test_save_works_when_parameters_are_views_of_one_flat_buffer(tmp_path, tie):
    """ZeRO-1/2 rebind every parameter to a view of one flat buffer; export must still work."""
    model = seeded_tiny_model(tie)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    params = list(model.parameters())  # each tied parameter once
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1

    model.save_pretrained(tmp_path)
    restored = DragonflyModel.from_pretrained(tmp_path).state_dict()
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(value, restored[name]), name


def test_bfloat16_config_casts_every_parameter_and_keeps_rotary_frequencies_float32():
    model = DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID, dtype="bfloat16")).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # Rounded to bf16, rotary angles drift with position: the text after an image block is far out.
    reference = DragonflyModel(DragonflyConfig.tiny(VOCAB, IMAGE_ID)).llm.model.rotary_emb
    rotary = model.llm.model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        assert getattr(rotary, name).dtype == torch.float32, name
        assert torch.equal(getattr(rotary, name), getattr(reference, name)), name
    assert model.vision.normalize(random_pixels(1)[0]).dtype == torch.bfloat16
    batch = make_batch([([1, 2], True, [3, 4])], model.layout.positions)
    with torch.no_grad():
        assert torch.isfinite(model(**batch, pixels=random_pixels(1)).loss)


# ---------------------------------------------------------------------------------------------
# Generation


def greedy_without_cache(
    model: DragonflyModel, batch: dict, pixels: torch.Tensor, steps: int
) -> torch.Tensor:
    """Reference: a full forward over the whole sequence for every new token, no KV cache."""
    embeds = model.embed_inputs(batch["input_ids"], pixels, batch["has_image"])
    mask = batch["attention_mask"]
    table = model.llm.get_input_embeddings()
    new = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model.llm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).logits
        token = logits[:, -1].argmax(-1)  # (B,)
        new.append(token)
        embeds = torch.cat([embeds, table(token)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return torch.stack(new, dim=1)


def test_generate_is_deterministic_and_matches_step_by_step_forward(model):
    batch = make_batch(
        [([1, 2], True, [3, 4, 5]), ([6, 7, 8, 9, 10, 11, 12], False, [])],
        model.layout.positions,
        left_pad=True,
    )
    pixels = random_pixels(1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "has_image")}
    first = model.generate(**inputs, pixels=pixels, max_new_tokens=6, pad_token_id=PAD)
    second = model.generate(**inputs, pixels=pixels, max_new_tokens=6, pad_token_id=PAD)
    assert first.shape == (2, 6) and torch.equal(first, second)
    with torch.no_grad():
        reference = greedy_without_cache(model, batch, pixels, steps=6)
    assert torch.equal(first, reference)


def test_generate_refuses_right_padding(model):
    batch = make_batch([([1, 2, 3], False, []), ([4], False, [])], 0)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# A tiny model overfits real photos, through the real tokenizer, processor and collate


PHOTOS = {
    "astronaut": "An astronaut in a white suit stands before a flag.",
    "coffee": "A cup of coffee sits on a small plate.",
    "chelsea": "A cat with green eyes looks to the left.",
    "rocket": "A rocket stands on the launch pad under a blue sky.",
}


def test_tiny_model_overfits_real_photos_and_then_describes_each_one():
    from PIL import Image
    from skimage import data

    from dragonfly.processor import DragonflyProcessor, collate
    from dragonfly.tiny import build_tiny_tokenizer
    from dragonfly.zoom import make_crops

    tokenizer = build_tiny_tokenizer(PHOTOS.values())
    processor = DragonflyProcessor(tokenizer, ZoomConfig(resolution=R), TINY_TOKENS)
    config = DragonflyConfig.tiny(len(tokenizer), processor.image_token_id)
    question = "<image>\nDescribe the picture."
    photos = {name: Image.fromarray(getattr(data, name)()) for name in PHOTOS}
    samples = [
        {
            **processor.encode(
                [{"from": "human", "value": question}, {"from": "gpt", "value": caption}], True
            ),
            "pixels": make_crops(photos[name], config.zoom).pixels,
        }
        for name, caption in PHOTOS.items()
    ]
    text_only = [
        {"from": "human", "value": "Is the light on?"},
        {"from": "gpt", "value": "Yes, the light is on."},
    ]
    samples.insert(2, processor.encode(text_only, has_image=False))  # a text-only sample mid-batch
    batch = collate(samples, processor.pad_token_id)

    torch.manual_seed(0)
    model = DragonflyModel(config).train()
    apply_freeze_plan(model, "stage2")
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.0), lr=3e-3)
    losses = []
    # Past the 90% drop, until the captions can only be told apart by looking at the image.
    while len(losses) < 300 and (not losses or losses[-1] > 0.03):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} after {len(losses)} steps"
    )

    # The same question for every photo, so each answer must come from its image; a text-only
    # conversation rides in the same left-padded batch (KV-cached greedy decoding).
    model.eval()
    answers = model.generate_text(
        processor,
        [*photos.values(), None],
        [[{"role": "user", "content": question}]] * len(photos)
        + [[{"role": "user", "content": "Is the light on?"}]],
        max_new_tokens=24,
    )
    assert answers == [*PHOTOS.values(), "Yes, the light is on."]


def test_gradient_checkpointing_in_both_towers_keeps_loss_and_gradients():
    batch = make_batch(
        [([1, 2], True, [3, 4]), ([5, 6], False, [])], DragonflyConfig.tiny(VOCAB, IMAGE_ID).layout.positions
    )
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = DragonflyConfig.tiny(VOCAB, IMAGE_ID, llm_gradient_checkpointing=checkpointing)
        config = dataclasses.replace(
            config, vision=dataclasses.replace(config.vision, gradient_checkpointing=checkpointing)
        )
        model = DragonflyModel(config).train()
        assert model.llm.is_activation_checkpointing == checkpointing
        loss = model(**batch, pixels=random_pixels(1)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)
