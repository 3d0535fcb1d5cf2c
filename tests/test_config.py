import dataclasses
import hashlib
import types
import typing
from pathlib import Path

import pytest
import yaml

from detector import config as config_module
from detector.config import (
    ARCHS,
    VERSION,
    Config,
    ConfigError,
    Range,
    config_from_dict,
    format_config,
    key_comments,
    load_config,
    load_yaml,
    parse_clock,
    sections,
    upgrade_config_dict,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


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


# --------------------------------------------------------------------------------------------
# Ranges and choices, checked at load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.min_size=0", "model.min_size=0: must be >= 1"),
        ("model.min_size=-5", "model.min_size=-5: must be >= 1"),
        ("model.max_size=0", "model.max_size=0: must be >= 1"),
        ("train.momentum=-1", "train.momentum=-1: must be in [0, 1)"),
        ("train.momentum=1", "train.momentum=1: must be in [0, 1)"),
        ("train.weight_decay=-1", "train.weight_decay=-1: must be >= 0"),
        ("train.device=garbage", "train.device=garbage: must be auto, cpu, cuda or cuda:N"),
        ("train.device=cuda:x", "train.device=cuda:x: must be auto, cpu, cuda or cuda:N"),
        ("train.lr=-0.01", "train.lr=-0.01: must be > 0"),
        ("train.lr=0", "train.lr=0: must be > 0"),
        ("train.lr=.inf", "train.lr=Infinity: must be > 0"),
        ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
        ("train.accumulate=0", "train.accumulate=0: must be >= 1"),
        ("train.warmup_iters=-1", "train.warmup_iters=-1: must be >= 0"),
        ("train.warmup_factor=0", "train.warmup_factor=0: must be in (0, 1]"),
        ("train.gamma=0", "train.gamma=0: must be > 0"),
        ("train.clip_grad_norm=-1", "train.clip_grad_norm=-1: must be >= 0"),
        ("train.milestones=[3, 0]", "train.milestones[1]=0: must be >= 1"),
        ("train.max_hours=0", "train.max_hours=0: must be > 0"),
        ("train.patience=-1", "train.patience=-1: must be >= 0"),
        ("train.log_every=0", "train.log_every=0: must be >= 1"),
        ("train.seed=-1", "train.seed=-1: must be >= 0"),
        ("train.max_nonfinite_batches=0", "train.max_nonfinite_batches=0: must be >= 1"),
        ("train.unfreeze.lr_scale=0", "train.unfreeze.lr_scale=0: must be > 0"),
        ("train.unfreeze.backbone_blocks=-1", "train.unfreeze.backbone_blocks=-1: must be >= 0"),
        ("train.optimizer=lion", "train.optimizer=lion: must be one of sgd, adamw"),
        ("train.scheduler=poly", "train.scheduler=poly: must be one of cosine, step"),
        ("train.amp_dtype=fp8", "train.amp_dtype=fp8: must be one of bfloat16, float16"),
        ("model.arch=yolov8", "model.arch=yolov8: must be one of fasterrcnn_resnet50_fpn,"),
        ("model.score_threshold=1.5", "model.score_threshold=1.5: must be in [0, 1]"),
        ("model.detections_per_image=0", "model.detections_per_image=0: must be >= 1"),
        ("model.rpn_post_nms_top_n_test=0", "model.rpn_post_nms_top_n_test=0: must be >= 1"),
        ("augment.blur=-0.1", "augment.blur=-0.1: must be in [0, 1]"),
        ("augment.scale_min=0", "augment.scale_min=0: must be > 0"),
        ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
        ("data.cache_images_max_gb=0", "data.cache_images_max_gb=0: must be > 0"),
        ("eval.every=0", "eval.every=0: must be >= 1"),
        ("eval.grid_images=-1", "eval.grid_images=-1: must be >= 0"),
        ("train.epochs=-1", "train.epochs=-1: must be >= 0"),
        ("train.epochs=0", "train.epochs=0: train.epochs + train.unfreeze.epochs must be >= 1"),
        ("augment.scale_min=2", "augment.scale_min=2.0: must be <= augment.scale_max (1.25)"),
        ("model.min_size=900", "model.min_size=900: must be <= model.max_size (800)"),
    ],
)
def test_bad_values_are_refused_with_key_value_and_range(tmp_path, override, message):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  max_size: 800\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)


@pytest.mark.parametrize("command", ["train", "config"])
def test_cli_names_file_key_value_and_range(tmp_path, capsys, command):
    from detector import cli

    path = tmp_path / "x.yaml"
    path.write_text("train:\n  momentum: -1\n")
    assert cli.main([command, str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: train.momentum=-1: must be in [0, 1)\n"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_devices_accepted(device):
    assert config_from_dict({"train": {"device": device}}).train.device == device


def test_zero_frozen_epochs_are_fine_with_an_unfreeze_phase():
    cfg = config_from_dict({"train": {"epochs": 0, "unfreeze": {"epochs": 3}}})
    assert (cfg.train.epochs, cfg.train.unfreeze.epochs) == (0, 3)


def _leaf_hints(cls=Config, prefix=""):
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            yield from _leaf_hints(hint, key + ".")
        else:
            yield key, hint


def _unwrap(hint):
    """The Annotated-or-plain types inside X | None and list[X]."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return [u for a in typing.get_args(hint) if a is not type(None) for u in _unwrap(a)]
    if origin is list:
        return _unwrap(typing.get_args(hint)[0])
    return [hint]


def test_every_numeric_key_has_a_range_and_every_text_choice_is_checked():
    for key, hint in _leaf_hints():
        for part in _unwrap(hint):
            if typing.get_origin(part) is typing.Annotated:
                base, *rules = typing.get_args(part)
                assert rules, key
                if base in (int, float):
                    assert any(isinstance(r, Range) for r in rules), key
            else:
                assert part in (bool, str) or typing.get_origin(part) is typing.Literal, (
                    f"{key}: numeric keys need a Range ({part})"
                )


def test_range_describe_and_allows():
    assert Range(0).describe() == ">= 0" and Range(0, low_open=True).describe() == "> 0"
    assert Range(0, 1, high_open=True).describe() == "in [0, 1)"
    assert Range(0.5).allows(0.5) and not Range(0.5, low_open=True).allows(0.5)
    assert not Range(0).allows(float("nan")) and not Range(0).allows(float("inf"))


# --------------------------------------------------------------------------------------------
# Clock times (train.until): YAML 1.1 would read 23:30 as the base-60 integer 1410
# --------------------------------------------------------------------------------------------

ALL_CLOCK_TIMES = [(h, m) for h in range(24) for m in range(60)]


def test_parse_clock_accepts_every_time_of_day():
    for h, m in ALL_CLOCK_TIMES:
        assert parse_clock(f"{h:02d}:{m:02d}") == (h, m)
    for h in range(10):
        assert parse_clock(f"{h}:30") == (h, 30)


@pytest.mark.parametrize(
    "text",
    [
        "24:00",
        "23:60",
        "12:5",
        "1230",
        "-1:00",
        "+1:00",
        " 6:00",
        "6:00 ",
        "12:00:00",
        "",
        "ab:cd",
        "٦:٠٠",
        "6h00",
        1410,
        None,
    ],
)
def test_parse_clock_refuses_bad_times(text):
    with pytest.raises(ConfigError, match="train.until=.*must be a clock time HH:MM"):
        parse_clock(text)


def test_every_clock_time_loads_from_yaml_and_from_the_command_line(tmp_path):
    texts = [f"{h:02d}:{m:02d}" for h, m in ALL_CLOCK_TIMES] + [f"{h}:00" for h in range(10)]
    for text in texts:
        assert load_yaml(f"until: {text}") == {"until": text}
    path = tmp_path / "night.yaml"
    for text in ("23:30", "22:00", "6:00", "00:00", "23:59"):
        path.write_text(f"train:\n  until: {text}\n")
        assert load_config(path).train.until == text
        assert load_config(None, [f"train.until={text}"]).train.until == text
    with pytest.raises(ConfigError, match="train.until=24:00: must be a clock time"):
        load_config(None, ["train.until=24:00"])
    path.write_text("train:\n  until: 0600\n")  # YAML's octal 384, not a time
    with pytest.raises(ConfigError, match="train.until=384: must be a clock time HH:MM"):
        load_config(path)


def test_yaml_numbers_still_read_as_numbers():
    values = load_yaml("a: 12\nb: 1e-3\nc: 1.5E+2\nd: -0.25\ne: 0x10\nf: .5\ng: true\nh: null")
    assert values == {
        "a": 12,
        "b": 1e-3,
        "c": 150.0,
        "d": -0.25,
        "e": 16,
        "f": 0.5,
        "g": True,
        "h": None,
    }
    assert isinstance(values["b"], float)
    assert load_config(None, ["train.lr=2e-3"]).train.lr == pytest.approx(2e-3)


# --------------------------------------------------------------------------------------------
# VERSION and renamed keys
# --------------------------------------------------------------------------------------------


def test_saved_config_carries_the_version_and_round_trips():
    cfg = config_from_dict({"train": {"epochs": 3, "until": "23:30"}})
    saved = cfg.to_dict()
    assert saved["version"] == VERSION and list(saved)[0] == "version"
    assert config_from_dict(saved) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(saved))) == cfg  # run's config.yaml


def test_config_from_a_newer_detector_is_refused():
    with pytest.raises(ConfigError, match=f"config version {VERSION + 1} is newer than this"):
        config_from_dict({"version": VERSION + 1})
    with pytest.raises(ConfigError, match="version=two: must be an integer"):
        config_from_dict({"version": "two"})


@pytest.fixture
def fake_rename(monkeypatch):
    """A next version that renamed two keys: the old names are invented, the new ones real."""
    monkeypatch.setattr(config_module, "VERSION", VERSION + 1)
    monkeypatch.setattr(
        config_module,
        "RENAMED_KEYS",
        {VERSION + 1: {"train.frozen_epochs": "train.epochs", "eval.period": "eval.every"}},
    )


@pytest.mark.usefixtures("fake_rename")
def test_older_config_has_renamed_keys_mapped():
    old = {"version": VERSION, "train": {"frozen_epochs": 7, "lr": 0.5}, "eval": {"period": 2}}
    cfg = config_from_dict(old)
    assert (cfg.train.epochs, cfg.train.lr, cfg.eval.every) == (7, 0.5, 2)
    assert old["train"] == {"frozen_epochs": 7, "lr": 0.5}  # the input is not changed
    # no version at all (checkpoints written before versions existed) counts as 0: mapped too
    assert config_from_dict({"train": {"frozen_epochs": 4}}).train.epochs == 4
    assert upgrade_config_dict(old)["version"] == VERSION + 1
    # a config of the current version is not renamed: the old name is an unknown key
    with pytest.raises(ConfigError, match="unknown key 'train.frozen_epochs'"):
        config_from_dict({"version": VERSION + 1, "train": {"frozen_epochs": 4}})


@pytest.mark.usefixtures("fake_rename")
def test_older_config_with_both_names_or_an_unknown_key_is_refused():
    with pytest.raises(
        ConfigError, match="'train.frozen_epochs' was renamed 'train.epochs' and both"
    ):
        config_from_dict({"version": VERSION, "train": {"frozen_epochs": 7, "epochs": 3}})
    with pytest.raises(
        ConfigError,
        match=rf"unknown key 'train.gone'.*config is version {VERSION}, this detector reads",
    ):
        config_from_dict({"version": VERSION, "train": {"gone": 1}})


@pytest.mark.usefixtures("fake_rename")
def test_older_checkpoint_config_is_mapped_on_load(tmp_path):
    from detector.model import load_checkpoint, save_checkpoint

    path = tmp_path / "old.pt"
    old_config = {"train": {"frozen_epochs": 7}, "data": {"val_annotations": "v.json"}}
    save_checkpoint(
        path, {"model": {}, "arch": ARCHS[0], "class_names": ["a"], "config": old_config}
    )
    checkpoint = load_checkpoint(path)
    assert checkpoint["config"]["version"] == VERSION + 1
    assert checkpoint["config"]["train"] == {"epochs": 7}
    assert config_from_dict(checkpoint["config"]).train.epochs == 7


def test_checkpoint_from_a_newer_config_version_is_refused(tmp_path):
    from detector.model import load_checkpoint, save_checkpoint

    path = tmp_path / "new.pt"
    new = {"model": {}, "arch": ARCHS[0], "class_names": ["a"], "config": {"version": VERSION + 1}}
    save_checkpoint(path, new)
    with pytest.raises(ConfigError, match=r"new.pt: saved config: config version \d+ is newer"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# `detector config`: the resolved config with every key's comment
# --------------------------------------------------------------------------------------------


def test_every_key_has_a_comment():
    comments = key_comments()
    keys = [k for k, _ in _leaf_hints()] + [p for p in sections() if p]
    missing = [k for k in keys if not comments.get(k)]
    assert not missing, f"keys without a comment in detector/config.py: {missing}"
    assert "momentum" in comments["train.momentum"]
    assert comments["train.device"].startswith("auto")  # a comment at the end of the line
    assert comments["data.val_images"] == comments["data.train_annotations"]  # a group
    assert "learning rate" not in comments["train.scheduler"]  # a new comment ends the group


def test_format_config_is_yaml_that_loads_back_with_comments(tmp_path):
    cfg = load_config(REPO / "configs/deer.yaml", ["train.until=23:30", "train.lr=1e-3"])
    text = format_config(cfg, "header line")
    assert text.startswith("# header line\n")
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    lines = text.splitlines()
    momentum = lines.index("  momentum: 0.9  # in [0, 1)")
    assert lines[momentum - 2 : momentum] == [
        "  optimizer: sgd  # one of sgd, adamw",
        "  lr: 0.001  # > 0",
    ]
    assert lines[momentum - 3].startswith("  # Optimizer, base learning rate, SGD momentum")
    assert "    backbone_blocks: 1  # >= 0" in lines
    assert sum(line.startswith("#") for line in lines) >= 5  # sections documented too


def test_cli_config_prints_resolved_config(capsys):
    from detector import cli

    assert cli.main(["config", str(REPO / "configs/sample.yaml"), "train.epochs=3"]) == 0
    out = capsys.readouterr().out
    values = load_yaml(out)
    assert values["version"] == VERSION and values["train"]["epochs"] == 3
    assert values["train"]["name"] == "sample"
    assert "# The config format's version" in out
    assert cli.main(["config", "train.until=22:00"]) == 0  # no file: defaults + overrides
    assert load_yaml(capsys.readouterr().out)["train"]["until"] == "22:00"
    assert cli.main(["config", "train.momentum=-1"]) == 2
    assert "train.momentum=-1: must be in [0, 1)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One list of architectures; the shipped sample config and its weights
# --------------------------------------------------------------------------------------------


def test_model_builds_exactly_the_config_architectures():
    from detector.model import ARCH_SPECS

    assert tuple(ARCH_SPECS) == ARCHS
    assert typing.get_args(typing.get_type_hints(config_module.ModelConfig)["arch"]) == ARCHS


def test_sample_config_resolves_its_shipped_weights(monkeypatch, tmp_path):
    from detector.model import resolve_weights_path

    cfg = load_config(REPO / "configs/sample.yaml")
    assert cfg.model.arch == "fasterrcnn_mobilenet_v2_fpn" and cfg.model.weights == "none"
    assert not Path(cfg.model.weights_backbone).is_absolute()
    assert cfg.model.freeze_backbone and cfg.train.unfreeze.epochs >= 1
    monkeypatch.chdir(tmp_path)  # a repository-relative path is found from any folder
    path = resolve_weights_path(cfg.model.weights_backbone, "model.weights_backbone")
    assert path == REPO / "weights/mobilenet_v2-b0353104.pth"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def test_missing_relative_weights_name_both_places(monkeypatch, tmp_path):
    from detector.model import WeightsError, resolve_weights_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        WeightsError, match=r"weights/nope.pth is not a file \(tried weights/nope.pth, "
    ):
        resolve_weights_path("weights/nope.pth", "model.weights_backbone")
