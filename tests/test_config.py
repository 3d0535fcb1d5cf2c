from pathlib import Path

import pytest

from detector.config import ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.name == path.stem
    assert cfg.data.train_annotations


def test_defaults_and_overrides():
    cfg = config_from_dict(
        {"train": {"epochs": 3}},
        [
            "train.epochs=20",
            "model.arch=fasterrcnn_mobilenet_v3_large_fpn",
            "train.lr=1e-3",
            "train.milestones=[2, 4]",
            "train.max_hours=0.5",
            "train.unfreeze.epochs=2",
        ],
    )
    assert cfg.train.epochs == 20
    assert cfg.model.arch == "fasterrcnn_mobilenet_v3_large_fpn"
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.milestones == [2, 4]
    assert cfg.train.unfreeze.epochs == 2
    assert cfg.train.batch_size == 4  # default untouched


def test_int_accepted_for_float():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    ("values", "overrides", "key"),
    [
        ({"train": {"epoch": 3}}, [], "train.epoch"),
        ({"modle": {}}, [], "modle"),
        ({}, ["train.unfreeze.blocks=2"], "train.unfreeze.blocks"),
        ({"train": {"epochs": "ten"}}, [], "train.epochs"),
        ({"train": {"amp": "yes"}}, [], "train.amp"),
        ({"train": {"milestones": [1, "x"]}}, [], "train.milestones[1]"),
        ({"model": {"arch": "yolov8"}}, [], "model.arch"),
        ({"train": {"optimizer": "lion"}}, [], "train.optimizer"),
        ({"augment": {"hflip": 1.5}}, [], "augment.hflip"),
        ({"train": {"until": "25:00"}}, [], "train.until"),
        ({"train": "fast"}, [], "train"),
        ({}, ["train.epochs"], "train.epochs"),
    ],
)
def test_errors_name_the_key(values, overrides, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(values, overrides)
    assert key in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml.*train\.epohcs"):
        load_config(unknown)


def test_yaml_is_loaded_safely(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("train: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(hostile)


def test_hash_changes_with_config():
    assert config_from_dict({}).hash() == config_from_dict({}).hash()
    assert config_from_dict({}).hash() != config_from_dict({"train": {"epochs": 1}}).hash()
