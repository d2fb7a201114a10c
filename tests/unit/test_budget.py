"""Token layout and appendix-F FLOPs: the paper's numbers, exactly."""

import json
import subprocess
import sys

import pytest

from dragonfly.budget import (
    DRAGONFLY_PRESETS,
    image_flops,
    image_token_layout,
    main,
    preset_report,
)
from dragonfly.config import ConfigError, TokenConfig, ZoomConfig


def test_paper_dragonfly_token_counts():
    layout = image_token_layout(ZoomConfig(), DRAGONFLY_PRESETS["dragonfly"])
    assert layout.n_crops == 41
    assert layout.image_tokens == 576 + 4 * 36 + 36 * 36 == 2016
    assert layout.image_tokens_with_cls == 2057
    assert layout.positions == 2098
    assert layout.per_level() == {
        "low": {"crops": 1, "tokens_per_crop": 576, "tokens": 576},
        "medium": {"crops": 4, "tokens_per_crop": 36, "tokens": 144},
        "high": {"crops": 36, "tokens_per_crop": 36, "tokens": 1296},
    }


def test_dragonfly_star_is_784_tokens():
    layout = image_token_layout(ZoomConfig(), DRAGONFLY_PRESETS["dragonfly_star"])
    assert layout.image_tokens == 64 + 4 * 36 + 36 * 16 == 784


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        (("low",), 576),
        (("medium",), 144),
        (("high",), 1296),
        (("low", "medium"), 720),
        (("low", "high"), 1872),
        (("low", "medium", "high"), 2016),
    ],
)
def test_level_subsets_of_table_2(levels, expected):
    layout = image_token_layout(ZoomConfig(levels=levels), TokenConfig())
    assert layout.image_tokens == expected
    assert layout.n_crops == sum(ZoomConfig(levels=levels).tiles_per_level().values())


def test_crop_spans_tile_the_block_with_separators():
    layout = image_token_layout(ZoomConfig(levels=("low", "medium")), TokenConfig())
    spans = layout.crop_spans()
    # low: CLS + 576 at [0, 577), separator at 577; first medium crop starts at 578.
    assert spans[0] == (0, 577)
    assert spans[1] == (578, 578 + 37)
    assert layout.separator_offsets()[-1] == layout.positions - 1
    no_sep = image_token_layout(ZoomConfig(), TokenConfig(keep_cls=False, separator=False))
    assert no_sep.positions == no_sep.image_tokens == 2016
    assert no_sep.crop_spans()[1] == (576, 612)


def test_pool_strides_for_the_paper_token_choices():
    strides = {n: TokenConfig(tokens=(("low", n),)).pool_stride("low", 24) for n in (576, 144, 64, 36, 16, 9)}
    assert strides == {576: 1, 144: 2, 64: 3, 36: 4, 16: 6, 9: 8}
    with pytest.raises(ConfigError, match="does not divide"):
        TokenConfig(tokens=(("low", 25),)).pool_stride("low", 24)
    with pytest.raises(ConfigError, match="square"):
        TokenConfig(tokens=(("low", 50),))


@pytest.mark.parametrize(
    ("preset", "tflops"),
    [("llava_uhd", 6.91), ("llava_hd", 40.33), ("dragonfly", 41.65), ("dragonfly_star", 25.27)],
)
def test_table_11_tflops(preset, tflops):
    # Table 11 prints 25.10 for Dragonfly*; the appendix-F formula gives 25.27 (docs/budget.md).
    assert preset_report(preset)["tflops"] == tflops


def test_flops_are_the_appendix_integers():
    report = image_flops(crops=41, image_tokens=2016)
    assert report.total_flops == 41_645_924_448_384
    assert report.vit_flops == 41 * 382_301_750_400


def test_zoom_config_rejects_unequal_grids_and_unknown_levels():
    with pytest.raises(ConfigError, match="same number of tiles"):
        ZoomConfig(medium_grids=((2, 2), (1, 3)))
    with pytest.raises(ConfigError, match="subset"):
        ZoomConfig(levels=("ultra",))
    with pytest.raises(ConfigError, match="unknown keys"):
        ZoomConfig.from_dict({"resolution": 336, "colour": "red"})


def test_configs_round_trip_through_json():
    zoom = ZoomConfig(levels=("high", "low"), grid_rule="aspect")
    assert zoom.levels == ("low", "high")
    assert ZoomConfig.from_dict(json.loads(json.dumps(zoom.to_dict()))) == zoom
    tokens = DRAGONFLY_PRESETS["dragonfly_star"]
    assert TokenConfig.from_dict(json.loads(json.dumps(tokens.to_dict()))) == tokens


def test_cli_prints_json_for_presets_and_custom_configs(capsys):
    assert main(["--preset", "dragonfly", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert (report["image_tokens"], report["positions"], report["tflops"]) == (2016, 2098, 41.65)
    assert main(["--levels", "low,high", "--tokens", "low=576,high=16", "--no-cls", "--json"]) == 0
    (custom,) = json.loads(capsys.readouterr().out)
    assert custom["image_tokens"] == 576 + 36 * 16
    assert custom["positions"] == custom["image_tokens"] + 37


def test_cli_runs_as_a_module():
    out = subprocess.run(
        [sys.executable, "-m", "dragonfly.budget"], capture_output=True, text=True, check=True
    ).stdout
    assert "dragonfly_star" in out and "41.65" in out and "40.33" in out


def test_cli_rejects_bad_token_spec():
    with pytest.raises(SystemExit):
        main(["--tokens", "low=fifty"])
