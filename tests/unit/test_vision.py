"""dragonfly.vision: normalisation on the device, penultimate-block features, chunking, weights."""

from __future__ import annotations

import dataclasses
import json

import open_clip
import pytest
import safetensors.torch
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from dragonfly.config import ConfigError
from dragonfly.model import TINY_VIT_CONFIG
from dragonfly.vision import VisionConfig, VisionTower

TINY = VisionConfig(
    model_name="dragonfly-tiny-vit", pretrained=None, model_config=TINY_VIT_CONFIG, chunk_size=64
)


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return VisionTower(TINY).eval()


def crops(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=generator)


def test_normalize_is_clip_mean_std_of_scaled_uint8(tower):
    x = crops(2)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(tower.normalize(x), (x.float() / 255 - mean) / std)


def test_shapes_and_grid(tower):
    cls, patches = tower(crops(3))
    assert (tower.image_size, tower.grid_side, tower.width) == (28, 4, 32)
    assert cls.shape == (3, 32) and patches.shape == (3, 16, 32)


def test_features_are_the_penultimate_block_before_the_final_norm(tower):
    # An unpruned open_clip model with the same weights: features must equal its block n-2 output.
    full = open_clip.create_model("dragonfly-tiny-vit", pretrained=None, force_quick_gelu=True).visual.eval()
    missing, _ = full.load_state_dict(tower.visual.state_dict(), strict=False)
    assert all(k.startswith(("transformer.resblocks.2.", "ln_post.", "proj")) for k in missing)
    x = crops(4)
    with torch.no_grad():
        out = full.forward_intermediates(
            tower.normalize(x),
            indices=[1],
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=True,
        )
        cls, patches = tower(x)
    torch.testing.assert_close(patches, out["image_intermediates"][0], rtol=0, atol=0)
    torch.testing.assert_close(cls, out["image_intermediates_prefix"][0][:, 0], rtol=0, atol=0)
    # The tower keeps no final norm, no head and no last block (they would get no gradients).
    assert len(tower.visual.transformer.resblocks) == 2 and tower.visual.proj is None
    assert not any(name.startswith("ln_post") for name, _ in tower.visual.named_parameters())


def test_chunking_does_not_change_features(tower):
    x = crops(7)
    with torch.no_grad():
        whole = tower(x)
        tower.config = dataclasses.replace(TINY, chunk_size=3)
        try:
            chunked = tower(x)
        finally:
            tower.config = TINY
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = VisionTower(TINY)
    checkpointed = VisionTower(dataclasses.replace(TINY, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    x = crops(3)
    grads = []
    for tower in (plain, checkpointed):
        tower.train()
        cls, patches = tower(x)
        (cls.square().sum() + patches.square().sum()).backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_weights_path_loads_a_local_open_clip_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = open_clip.create_model("dragonfly-tiny-vit", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    tower = VisionTower(dataclasses.replace(TINY, weights_path=str(path)))
    for name, value in tower.visual.state_dict().items():
        assert torch.equal(value, source.visual.state_dict()[name]), name


def test_bad_inputs_and_configs_are_refused(tower):
    with pytest.raises(TypeError, match="uint8"):
        tower(crops(1).float())
    with pytest.raises(ValueError, match=r"\(N, 3, 28, 28\)"):
        tower(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="download"):
        VisionConfig(pretrained=None, weights_path="s3://bucket/clip.pt")
    with pytest.raises(ConfigError, match="not both"):
        VisionConfig(pretrained="openai", weights_path="/tmp/clip.pt")
    with pytest.raises(ConfigError, match="unknown keys"):
        VisionConfig.from_dict({"model_name": "ViT-B-32", "pretrained_tag": "openai"})
    with pytest.raises(ConfigError, match="built-in"):
        VisionTower(VisionConfig(model_name="ViT-B-32", pretrained=None, model_config=TINY_VIT_CONFIG))


def test_normalisation_override_is_recorded_for_rebuilds():
    tower = VisionTower(dataclasses.replace(TINY, pixel_mean=(0.5, 0.5, 0.5), pixel_std=(0.5, 0.5, 0.5)))
    x = crops(1)
    torch.testing.assert_close(tower.normalize(x), x.float() / 255 * 2 - 1)
    rebuilt = tower.rebuild_config()
    assert (rebuilt.pretrained, rebuilt.weights_path, rebuilt.pixel_std) == (None, None, (0.5, 0.5, 0.5))
    assert VisionConfig.from_dict(json.loads(json.dumps(rebuilt.to_dict()))) == rebuilt  # lists -> tuples
