"""dragonfly.convert: HF CLIP -> open_clip tower, and a tiny checkpoint in the released layout."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from dragonfly.config import ConfigError
from dragonfly.convert import (
    RELEASED_IMAGE_NEWLINE_TOKEN,
    clip_vision_to_open_clip,
    convert_released_checkpoint,
    load_clip_vision_weights,
    main,
    released_config,
)
from dragonfly.model import TINY_VIT_CONFIG, DragonflyConfig, DragonflyModel, tiny_llama_config
from dragonfly.processor import IMAGE_TOKEN, DragonflyProcessor
from dragonfly.tiny import build_tiny_tokenizer
from dragonfly.vision import VisionConfig, VisionTower

VOCAB, IMAGE_ID = 96, 95
NEWLINE_ID = 3  # stands in for Llama-3's <|reserved_special_token_1|> (128003)
VIT = TINY_VIT_CONFIG["vision_cfg"]


def tiny_hf_clip(seed: int = 0) -> CLIPVisionModel:
    """Random HF CLIP vision model shaped like the tiny open_clip config (3 blocks, QuickGELU)."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=VIT["width"],
        intermediate_size=4 * VIT["width"],
        num_hidden_layers=VIT["layers"],
        num_attention_heads=VIT["width"] // VIT["head_width"],
        image_size=VIT["image_size"],
        patch_size=VIT["patch_size"],
        hidden_act="quick_gelu",
    )
    model = CLIPVisionModel(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so a mix-up shows
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def released_layout(hf_clip: CLIPVisionModel, llm: LlamaForCausalLM, projector: torch.nn.Linear) -> dict:
    state = {
        f"image_encoder.vision_model.{k.removeprefix('vision_model.')}": v
        for k, v in hf_clip.state_dict().items()
    }
    state |= {f"vision_embed_tokens.{k}": v for k, v in projector.state_dict().items()}
    state |= {f"language_model.{k}": v for k, v in llm.state_dict().items()}
    return state


def tiny_llm(seed: int = 1, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    settings = tiny_llama_config(vocab)
    settings.pop("model_type")
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def test_converted_tower_matches_hf_hidden_states_minus_2():
    hf = tiny_hf_clip()
    tower = VisionTower(
        VisionConfig(model_name="dragonfly-tiny-vit", pretrained=None, model_config=TINY_VIT_CONFIG)
    )
    dropped = load_clip_vision_weights(tower, hf.state_dict())
    # The last block and the final norm are what the penultimate-layer features never use.
    assert any(k.startswith(f"transformer.resblocks.{VIT['layers'] - 1}.") for k in dropped)
    assert {"ln_post.weight", "ln_post.bias"} <= set(dropped)

    crops = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        cls, patches = tower.eval()(crops)
        reference = hf(pixel_values=tower.normalize(crops), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cls, reference[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, reference[:, 1:], atol=1e-5, rtol=0)
    # And not the last layer: the comparison above would fail against the wrong hidden state.
    assert (patches - hf(pixel_values=tower.normalize(crops)).last_hidden_state[:, 1:]).abs().max() > 1e-3


def test_qkv_are_packed_in_q_k_v_order():
    hf = tiny_hf_clip()
    state = hf.state_dict()
    converted = clip_vision_to_open_clip(state)
    packed = converted["transformer.resblocks.0.attn.in_proj_weight"]
    width = VIT["width"]
    for i, name in enumerate("qkv"):
        key = next(k for k in state if k.endswith(f"layers.0.self_attn.{name}_proj.weight"))
        assert torch.equal(packed[i * width : (i + 1) * width], state[key])


def test_tower_with_other_depth_is_refused():
    hf = tiny_hf_clip()
    deeper = dict(TINY_VIT_CONFIG, vision_cfg=dict(VIT, layers=4))
    tower = VisionTower(VisionConfig(model_name="dragonfly-tiny-vit-4", pretrained=None, model_config=deeper))
    with pytest.raises(ValueError, match="3 blocks"):
        load_clip_vision_weights(tower, hf.state_dict())


def test_unknown_clip_tensor_is_refused():
    state = dict(tiny_hf_clip().state_dict())
    state["encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="rotary"):
        clip_vision_to_open_clip(state)


def _released_fixture():
    hf, llm = tiny_hf_clip(), tiny_llm()
    torch.manual_seed(2)
    projector = torch.nn.Linear(VIT["width"], llm.config.hidden_size)
    return hf, llm, projector, released_layout(hf, llm, projector)


def test_released_checkpoint_converts_into_dragonfly_model():
    hf, llm, projector, state = _released_fixture()
    config = DragonflyConfig.tiny(VOCAB, IMAGE_ID)
    model = convert_released_checkpoint(state, config, image_newline_id=NEWLINE_ID).eval()

    assert torch.equal(model.projector.proj.weight, projector.weight)
    assert torch.equal(model.projector.proj.bias, projector.bias)
    for key, value in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[key], value), key
    # The converted model's image block uses the HF tower's penultimate features, projected.
    pixels = torch.randint(0, 256, (1, config.layout.n_crops, 3, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        blocks = model.encode_images(pixels)
        hidden = hf(pixel_values=model.vision.normalize(pixels[0]), output_hidden_states=True).hidden_states[
            -2
        ]
    first_cls = projector(hidden[0, 0])  # the low crop's CLS row opens the block
    torch.testing.assert_close(blocks[0, 0], first_cls, atol=1e-5, rtol=0)
    # After each crop: the released "image newline", the LLM's embedding of its token.
    newline = llm.get_input_embeddings().weight[NEWLINE_ID]
    per_crop = [
        1 + n + 1
        for level, k in config.zoom.tiles_per_level().items()
        for n in [config.tokens.for_level(level)] * k
    ]
    ends = [sum(per_crop[: i + 1]) - 1 for i in range(len(per_crop))]
    assert ends[-1] == config.layout.positions - 1
    for end in ends:
        assert torch.equal(blocks[0, end], newline), end


def test_a_newline_id_outside_the_vocabulary_is_refused():
    *_, state = _released_fixture()
    with pytest.raises(ConfigError, match="image newline id 128003 is outside the LLM's vocabulary of 96"):
        convert_released_checkpoint(state, DragonflyConfig.tiny(VOCAB, IMAGE_ID))


def test_released_checkpoint_with_stray_tensor_is_refused():
    *_, state = _released_fixture()
    state["mm_projector.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="mm_projector"):
        convert_released_checkpoint(state, DragonflyConfig.tiny(VOCAB, IMAGE_ID))


def test_cli_converts_a_sharded_checkpoint(tmp_path):
    hf, llm, projector, state = _released_fixture()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    keys = sorted(state)
    # Two shards, like the released files (safetensors, never pickles).
    safetensors.torch.save_file(
        {k: state[k].contiguous() for k in keys[::2]}, str(src / "model-00001-of-00002.safetensors")
    )
    safetensors.torch.save_file(
        {k: state[k].contiguous() for k in keys[1::2]}, str(src / "model-00002-of-00002.safetensors")
    )
    config_path = tmp_path / "ours.json"
    config_path.write_text(DragonflyConfig.tiny(VOCAB, IMAGE_ID).to_json())

    assert (
        main([str(src), str(dst), "--config", str(config_path), "--image-newline-id", str(NEWLINE_ID)]) == 0
    )
    model = DragonflyModel.from_pretrained(dst)
    assert torch.equal(model.projector.proj.weight, projector.weight)
    assert torch.equal(model.projector.separator, llm.get_input_embeddings().weight[NEWLINE_ID])
    assert json.loads((dst / "config.json").read_text())["vision"]["pretrained"] is None


def test_cli_with_the_released_tokenizer_writes_a_complete_export(tmp_path):
    """With the tokenizer in SRC (as in the released repositories) the output is an export that
    evaluation and init_from load as is: weights plus a processor with the released prompt."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [RELEASED_IMAGE_NEWLINE_TOKEN]})
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    newline_id = tokenizer.convert_tokens_to_ids(RELEASED_IMAGE_NEWLINE_TOKEN)  # not given: read from SRC
    vocab = len(tokenizer)
    llm = tiny_llm(vocab=vocab)
    torch.manual_seed(2)
    state = released_layout(tiny_hf_clip(), llm, torch.nn.Linear(VIT["width"], llm.config.hidden_size))
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    tokenizer.save_pretrained(src)
    for image_token_id, status in ((IMAGE_ID, 2), (image_id, 0)):
        config_path = tmp_path / f"ours-{image_token_id}.json"
        config_path.write_text(DragonflyConfig.tiny(vocab, image_token_id).to_json())
        args = [str(src), str(dst), "--config", str(config_path)]
        if status:  # the config's <image> id is not the tokenizer's: refused before any work
            with pytest.raises(SystemExit) as exit_info:
                main(args)
            assert exit_info.value.code == status and not dst.exists()
        else:
            assert main(args) == 0
    processor = DragonflyProcessor.from_pretrained(dst)
    assert processor.chat_template == "released" and processor.image_token_id == image_id
    model = DragonflyModel.from_pretrained(dst)
    assert model.config.image_token_id == image_id
    assert torch.equal(model.projector.separator, llm.get_input_embeddings().weight[newline_id])


def test_released_config_has_the_released_layout():
    """One CLS and one image newline per crop: 2098 positions, the block the released processor
    builds (577 + 40 x 37 features, a newline after each crop)."""
    config = released_config({"text_config": {"hidden_size": 4096, "num_hidden_layers": 32}}, 128256)
    assert (config.tokens.keep_cls, config.tokens.separator) == (True, True)
    assert config.layout.positions == 577 + 1 + 40 * (37 + 1) == 2098
    assert (config.vision.model_name, config.vision.quick_gelu) == ("ViT-L-14-336", True)
