"""The run config: recipes match the paper, bad configs fail early with one message per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dragonfly_platform.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
    parse_run_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
# Other jobs' configs live there too (data preparation, sweeps, promotion); these are training recipes.
RECIPES = [
    CONFIGS / f"{name}.yaml"
    for name in (
        "stage1",
        "stage2",
        "dragonfly_star_stage1",
        "dragonfly_star_stage2",
        "med_stage1",
        "med_stage2",
        "med_stage3",
        "tiny_stage1",
        "tiny_stage2",
    )
]


def tiny(**sections) -> dict:
    raw = yaml.safe_load((CONFIGS / "tiny_stage1.yaml").read_text())
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def problems(raw: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_run_config(raw, "test.yaml")
    return str(err.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_shows_its_command(path):
    cfg = load_run_config(path)
    assert cfg.gradient_accumulation_steps() >= 1
    header = path.read_text().split("\n\n")[0]
    assert header.startswith("#") and f"jobs/train.py --config jobs/configs/{path.name}" in path.read_text()


@pytest.mark.parametrize("path", [p for p in RECIPES if load_run_config(p).run.use_gpu], ids=lambda p: p.stem)
def test_gpu_recipes_keep_the_crop_work_on_the_cpu_group(path):
    """GPU nodes have CPUs too: without the CPU group's custom resource (infra/: `cpu_preprocess`),
    Ray Data would crop on the GPU nodes and take their CPUs from the training workers."""
    assert load_run_config(path).data.preprocess_resources == {"cpu_preprocess": 0.001}


def test_a_preprocess_resource_that_no_node_offers_is_named():
    """What the driver warns about: on one GPU box the recipes' CPU-group resource does not exist."""
    from dragonfly_platform.data import unoffered_preprocess_resources

    data = load_run_config(CONFIGS / "stage1.yaml").data
    assert unoffered_preprocess_resources(data, {"CPU": 192.0, "GPU": 8.0}) == ["cpu_preprocess"]
    assert unoffered_preprocess_resources(data, {"CPU": 224.0, "GPU": 8.0, "cpu_preprocess": 1000.0}) == []
    assert (
        unoffered_preprocess_resources(load_run_config(CONFIGS / "tiny_stage1.yaml").data, {"CPU": 2.0}) == []
    )


def test_actor_pools_need_room_for_every_rank_and_a_validation_task():
    """What the driver warns about before training: ranks whose pools cannot all start hang."""
    from dragonfly_platform.train import actor_pool_room

    def with_actors(name: str, **data):
        cfg = load_run_config(CONFIGS / name)
        return cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"preprocess_pool": "actors", **data})}
        )

    # 2 ranks x 1 actor x 0.5 CPU + a 0.5-CPU validation task + 2 x 0.5 CPU of workers: over 2 CPUs.
    tiny = with_actors("tiny_stage1.yaml", preprocess_num_cpus=0.5)
    assert actor_pool_room(tiny, [{"CPU": 2.0}]) == (2.5, 2.0)
    assert actor_pool_room(
        tiny.model_copy(update={"data": tiny.data.model_copy(update={"val_manifest": None})}), [{"CPU": 2.0}]
    ) == (2.0, 2.0)
    # The pools only count the CPU group's nodes; the GPU nodes' CPUs belong to the workers.
    stage1 = with_actors("stage1.yaml", preprocess_concurrency=2)  # 16 ranks
    gpu, cpu = {"CPU": 180.0, "GPU": 8.0}, {"CPU": 30.0, "cpu_preprocess": 1000.0}
    assert actor_pool_room(stage1, [gpu, gpu, cpu]) == (33.0, 30.0)
    assert actor_pool_room(stage1, [gpu, gpu, cpu, cpu]) == (33.0, 60.0)
    # A sweep counts each trial's pools with its workers: trials' pools cannot share CPUs.
    from dragonfly_platform.sweep_config import DRIVER_CPUS, trial_resources

    assert trial_resources(tiny)["CPU"] == DRIVER_CPUS + 2 * 0.5 + 2 * 0.5


def test_an_actor_pool_needs_a_size():
    from dragonfly_platform.data import DataConfig

    with pytest.raises(ValueError, match="needs preprocess_concurrency"):
        DataConfig(train_manifest="m.jsonl", preprocess_pool="actors")


def test_paper_stage_recipes_follow_table_10():
    stage1, stage2 = load_run_config(CONFIGS / "stage1.yaml"), load_run_config(CONFIGS / "stage2.yaml")
    for cfg, batch, lr, plan in ((stage1, 64, 2e-5, "stage1"), (stage2, 16, 2e-6, "stage2")):
        assert cfg.train.global_batch_size == batch
        assert cfg.train.lr == lr
        assert cfg.train.freeze == plan
        assert cfg.train.schedule == "cosine" and cfg.train.warmup_ratio == 0.01
        assert cfg.processor.max_length == 4096
        assert cfg.train.epochs == 1
    assert stage1.dragonfly_config().tokens.per_level() == {"low": 576, "medium": 36, "high": 36}
    assert stage2.train.init_from.endswith("dragonfly-stage1/export")


def test_dragonfly_star_pools_64_36_16_tokens():
    cfg = load_run_config(CONFIGS / "dragonfly_star_stage1.yaml")
    model = cfg.dragonfly_config()
    assert model.tokens.per_level() == {"low": 64, "medium": 36, "high": 16}
    assert model.layout.image_tokens == 64 + 4 * 36 + 36 * 16 == 784


def test_med_recipes_follow_table_16_and_chain():
    s1, s2, s3 = (load_run_config(CONFIGS / f"med_stage{i}.yaml") for i in (1, 2, 3))
    assert (s1.train.freeze, s1.train.global_batch_size, s1.train.lr) == ("med_stage1", 64, 2e-5)
    assert (s2.train.freeze, s2.train.global_batch_size, s2.train.lr) == ("stage2", 16, 2e-6)
    assert (s3.train.freeze, s3.train.global_batch_size, s3.train.lr) == ("stage2", 16, 2e-6)
    assert s1.train.init_from.startswith("models:/")  # the general model from the registry
    assert s2.train.init_from.endswith(f"{s1.run.name}/export")
    assert s3.train.init_from.endswith(f"{s2.run.name}/export")


def test_unknown_key_is_named():
    message = problems(tiny(train={"lrr": 1e-3}))
    assert "train.lrr: unknown key" in message


def test_unknown_section_is_named():
    raw = tiny()
    raw["trian"] = {"lr": 1}
    assert "trian: unknown key" in problems(raw)


def test_wrong_type_names_key_and_value():
    message = problems(tiny(train={"global_batch_size": "lots"}))
    assert "train.global_batch_size" in message and "'lots'" in message


def test_every_field_problem_is_listed_at_once():
    message = problems(tiny(train={"lr": -1, "zero_stage": 5}, run={"num_workers": 0}))
    assert "3 problem(s)" in message
    for key in ("train.lr", "train.zero_stage", "run.num_workers"):
        assert key in message


def test_pipeline_sizes_seeds_and_storage_scheme_are_checked_before_any_work():
    message = problems(
        tiny(
            data={
                "rows_per_block": 0,
                "fetch_threads": 0,
                "max_bad_fraction": 1.5,
                "shuffle_seed": -1,
            },
            train={"seed": -1},
            run={"storage_path": "gs://bucket/runs"},
        )
    )
    assert "6 problem(s)" in message
    for key in ("rows_per_block", "fetch_threads", "max_bad_fraction", "shuffle_seed", "train.seed"):
        assert key in message
    assert "run.storage_path: must be a local folder or s3://bucket/prefix, got 'gs://bucket/runs'" in message


def test_global_batch_must_divide_by_workers_and_micro_batch():
    message = problems(tiny(train={"global_batch_size": 10, "micro_batch_size": 2}, run={"num_workers": 2}))
    assert "global_batch_size=10 is not divisible" in message and "= 4 samples per micro-step" in message


def test_zero3_with_frozen_vision_tower_is_refused():
    message = problems(tiny(train={"zero_stage": 3, "freeze": "stage1"}))
    assert "zero_stage=3" in message and "frozen vision tower" in message
    # Plans that train the tower are fine under ZeRO-3 (with the ViT encoding a micro-batch at once).
    one_chunk = {"preset": "tiny", "vision": {"chunk_size": 82}}  # 2 images x 41 crops
    for plan in ("stage2", "med_stage1"):
        parse_run_config(tiny(train={"zero_stage": 3, "freeze": plan}, model=one_chunk))


def test_zero3_needs_the_vit_to_run_once_per_micro_batch():
    message = problems(tiny(train={"zero_stage": 3, "freeze": "stage2"}))
    assert "model.vision.chunk_size >= micro_batch_size x crops per image = 82 (got 64)" in message


def test_offload_combinations():
    assert "offload_params needs train.zero_stage=3" in problems(
        tiny(train={"offload_params": True, "zero_stage": 2}, run={"use_gpu": True})
    )
    assert "needs run.use_gpu" in problems(tiny(train={"offload_optimizer": True}))
    assert "precision=bf16 needs run.use_gpu" in problems(tiny(train={"precision": "bf16"}))


def test_model_or_init_from():
    raw = tiny()
    del raw["model"]
    assert "give a `model` section or `train.init_from`" in problems(raw)
    assert "exclude each other" in problems(tiny(train={"init_from": "runs/x/export"}))


def test_model_section_errors_are_reported():
    assert "model:" in problems(tiny(model={"preset": "tiny", "pooling": "max"}))
    assert "unknown keys ['colour']" in problems(tiny(model={"preset": "tiny", "colour": "red"}))
    assert "model.preset must be one of" in problems(tiny(model={"preset": "huge"}))


def test_model_overrides_merge_into_the_preset():
    cfg = parse_run_config(
        tiny(model={"preset": "tiny", "pooling": "perceiver", "tokens": {"keep_cls": False}})
    )
    model = cfg.dragonfly_config()
    assert model.pooling == "perceiver"
    assert model.tokens.keep_cls is False
    assert model.tokens.per_level() == {"low": 16, "medium": 4, "high": 1}  # kept from the preset


def test_set_overrides_parse_yaml_scalars(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text((CONFIGS / "tiny_stage1.yaml").read_text())
    cfg = load_run_config(
        path, ["train.lr=1.0e-4", "run.name=other", "train.max_steps=3", "run.use_gpu=false"]
    )
    assert (cfg.train.lr, cfg.run.name, cfg.train.max_steps) == (1e-4, "other", 3)
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="train.bogus: unknown key"):
        load_run_config(path, ["train.bogus=1"])


def test_apply_overrides_creates_nested_keys():
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=[1, 2]"]) == {"a": {"b": 1, "c": {"d": [1, 2]}}}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)


def test_derived_values():
    cfg = parse_run_config(
        tiny(train={"global_batch_size": 16, "micro_batch_size": 2}, run={"num_workers": 2})
    )
    assert cfg.gradient_accumulation_steps() == 4
    assert cfg.gradient_accumulation_steps(world_size=8) == 1
    with pytest.raises(ConfigError, match="not divisible"):
        cfg.gradient_accumulation_steps(world_size=3)
    assert cfg.resolved_precision() == "fp32" and cfg.resolved_checkpoint_upload() == "sync"
    gpu = parse_run_config(tiny(run={"use_gpu": True}))
    assert gpu.resolved_precision() == "bf16" and gpu.resolved_checkpoint_upload() == "async"


def test_relative_paths_become_absolute(tmp_path):
    cfg = parse_run_config(tiny(train={"max_steps": 2})).with_absolute_paths(tmp_path)
    assert cfg.run.storage_path == str(tmp_path / "runs")
    assert cfg.data.train_manifest == str(tmp_path / "data/demo/train.jsonl")
    stage2 = load_run_config(CONFIGS / "stage2.yaml").with_absolute_paths(tmp_path)
    assert stage2.train.init_from.startswith("s3://")  # URIs stay as they are


def test_embedded_tracking_store_lives_in_the_storage_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = parse_run_config(tiny(run={"storage_path": str(tmp_path)}))
    assert cfg.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri() == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    on_s3 = parse_run_config(tiny(run={"storage_path": "s3://bucket/runs"}))
    with pytest.raises(ConfigError, match="set mlflow.tracking_uri"):
        on_s3.tracking_uri()


def test_flatten_leaves_secrets_out():
    planted = "planted-secret-d41d8cd9"
    cfg = parse_run_config(
        tiny(
            data={"storage": {"access_key": "AKIAPLANTED", "secret_key": planted}},
            model={"preset": "tiny", "tokens": {"tokens": {"low": 16, "medium": 4, "high": 1}}},
            mlflow={"tracking_uri": f"https://alice:{planted}@mlflow.example.com:5000/"},
        )
    )
    flat = cfg.flatten()
    assert flat["train.lr"] == "0.002"
    assert flat["model.tokens.tokens.low"] == "16"  # "tokens" is not a secret
    assert flat["mlflow.tracking_uri"] == "https://alice:***@mlflow.example.com:5000/"
    assert not any(planted in v or "AKIAPLANTED" in v for v in flat.values())
    assert not any("secret" in k or "access_key" in k for k in flat)


def test_run_config_is_frozen():
    cfg = parse_run_config(tiny())
    assert isinstance(cfg, RunConfig)
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 1.0
