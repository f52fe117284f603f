"""Config: defaults, precedence, overrides and the one-line error for each kind of mistake."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import pytest
import yaml

from clmtl.config import Config, check_model_input, load_config
from clmtl.errors import ConfigError
from clmtl.settings import setting


@dataclass(frozen=True)
class EwcLike:
    lambda_: float = setting(1000.0)  # config key: lambda
    mode: str = setting("separate")
    decay_factor: float | None = setting(None)


@dataclass(frozen=True)
class ReplayLike:
    mem_size: int = setting(10)
    tasks_balanced: bool = setting(True)


STRATEGIES = {"ewc": EwcLike, "replay": ReplayLike}


def error_of(path=None, overrides=(), strategies=STRATEGIES) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, strategies)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- defaults

def test_default_yaml_equals_dataclass_defaults():
    raw = yaml.safe_load(resources.files("clmtl").joinpath("default.yaml").read_text(encoding="utf-8"))
    assert raw == Config().to_dict()
    assert load_config(None) == Config()


def test_defaults_have_the_brief_values():
    cfg = Config()
    assert (cfg.benchmark, cfg.seed, cfg.tasks) == ("shapes", 0, ["seg", "det", "cls"])
    assert cfg.model.weights is None and cfg.strategy == {}


# ------------------------------------------------------------------------------------------------ overrides

def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config(None, ["train.epochs.det=30", "train.lr=1e-3", "output.tensorboard=true",
                             "tasks=[det, seg, cls]", "model.weights=/w/yolov8n.pt", "seed=7"])
    assert cfg.train.epochs.det == 30 and cfg.train.epochs.seg == 15
    assert cfg.train.lr == 0.001 and isinstance(cfg.train.lr, float)
    assert cfg.output.tensorboard is True
    assert cfg.tasks == ["det", "seg", "cls"]
    assert cfg.model.weights == "/w/yolov8n.pt"
    assert cfg.seed == 7


def test_int_is_accepted_for_float_and_converted():
    cfg = load_config(None, ["train.lr=1", "eval.iou_threshold=1"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert type(cfg.eval.iou_threshold) is float


def test_single_number_sets_epochs_of_every_task():
    cfg = load_config(None, ["train.epochs=3", "train.epochs.cls=1"])
    assert (cfg.train.epochs.seg, cfg.train.epochs.det, cfg.train.epochs.cls) == (3, 3, 1)
    assert [cfg.train.epochs[name] for name in ("seg", "det", "cls")] == [3, 3, 1]
    with pytest.raises(KeyError):
        cfg.train.epochs["depth"]


def test_hue_is_per_task_like_epochs():
    defaults = load_config(None, []).data.hue
    assert [defaults[name] for name in ("seg", "det", "cls")] == [0.0, 0.0, 0.0]
    cfg = load_config(None, ["data.hue=0.1", "data.hue.det=0"])
    assert (cfg.data.hue.seg, cfg.data.hue.det, cfg.data.hue.cls) == (0.1, 0.0, 0.1)


def test_precedence_defaults_file_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.01\n  batch_size: 8\n  epochs: {seg: 2}\n")
    cfg = load_config(path, ["train.lr=0.02", "train.lr=0.05"])
    assert cfg.train.lr == 0.05  # last override wins
    assert cfg.train.batch_size == 8  # file over default
    assert cfg.train.epochs.seg == 2 and cfg.train.epochs.det == 25  # partial section merges with defaults
    assert cfg.train.weight_decay == Config().train.weight_decay


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == Config()


def test_to_dict_round_trips_through_load(tmp_path):
    cfg = load_config(None, ["train.lr=1e-4", "strategy.ewc.lambda=500", "tasks=[cls, det, seg]",
                             "model.weights=w.pt", "output.checkpoints=false"], STRATEGIES)
    as_dict = cfg.to_dict()
    json.dumps(as_dict)  # JSON-able
    path = write(tmp_path, yaml.safe_dump(as_dict))
    assert load_config(path, (), STRATEGIES) == cfg


# ------------------------------------------------------------------------------------------------ strategies

def test_strategy_params_merge_over_defaults_of_mentioned_strategies_only():
    cfg = load_config(None, ["strategy.ewc.lambda=500", "strategy.ewc.decay_factor=0.9"], STRATEGIES)
    assert cfg.strategy == {"ewc": {"lambda": 500.0, "mode": "separate", "decay_factor": 0.9}}
    assert type(cfg.strategy["ewc"]["lambda"]) is float


def test_strategy_named_without_params_gets_its_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "strategy:\n  replay:\n"), (), STRATEGIES)
    assert cfg.strategy == {"replay": {"mem_size": 10, "tasks_balanced": True}}


@pytest.mark.parametrize("override, message", [
    ("strategy.ewcc.lambda=3", "override 'strategy.ewcc.lambda=3': strategy.ewcc: unknown strategy; "
                               "did you mean 'strategy.ewc'?"),
    ("strategy.lwf.alpha=1", "override 'strategy.lwf.alpha=1': strategy.lwf: unknown strategy; "
                             "registered: ewc, replay"),
    ("strategy.ewc.lamda=3", "override 'strategy.ewc.lamda=3': strategy.ewc.lamda: unknown key; "
                             "did you mean 'strategy.ewc.lambda'?"),
    ("strategy.ewc.lambda=big", "override 'strategy.ewc.lambda=big': strategy.ewc.lambda: expected a number, "
                                "got string \"big\""),
    ("strategy.replay.mem_size=2.5", "override 'strategy.replay.mem_size=2.5': strategy.replay.mem_size: "
                                     "expected an integer, got number 2.5"),
    ("strategy.replay.tasks_balanced=1", "override 'strategy.replay.tasks_balanced=1': "
                                         "strategy.replay.tasks_balanced: expected true or false, got integer 1"),
    ("strategy.replay=5", "override 'strategy.replay=5': strategy.replay: expected a mapping of keys, "
                          "got integer 5"),
])
def test_strategy_errors(override, message):
    assert error_of(overrides=[override]) == message


# ---------------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("override, message", [
    ("foo", "override 'foo': expected KEY=VALUE, e.g. train.lr=0.001"),
    ("train..lr=1", "override 'train..lr=1': malformed key 'train..lr'; expected dotted names like train.epochs.det"),
    ("train.lr=[1,", "override 'train.lr=[1,': invalid YAML: expected the node content, but found '<stream end>'"),
    ("train.lrr=0.1", "override 'train.lrr=0.1': train.lrr: unknown key; did you mean 'train.lr'?"),
    ("lr=0.1", "override 'lr=0.1': lr: unknown key; did you mean 'train.lr'?"),
    ("train.epochs.seeg=1", "override 'train.epochs.seeg=1': train.epochs.seeg: unknown key; "
                            "did you mean 'train.epochs.seg'?"),
    ("data.zzz=1", "override 'data.zzz=1': data.zzz: unknown key; "
                   "known keys: image_size, channels, train_size, val_size, num_workers, hflip, hue, root, "
                   "on_bad_sample, holdout, seg, det, cls"),
    ("data.det.val_anns=x", "override 'data.det.val_anns=x': data.det.val_anns: unknown key; "
                            "did you mean 'data.det.val_ann'?"),
    ("model.backbone=resnet50", "override 'model.backbone=resnet50': model.backbone: must be one of yolov8n, "
                                "mobilenet_v3_small, efficientnet_b0, mlp, reduced_resnet18, got \"resnet50\""),
    ("data.cls.train_size=0", "override 'data.cls.train_size=0': data.cls.train_size: must be >= 1, got 0"),
    ("train.lr=true", "override 'train.lr=true': train.lr: expected a number, got boolean true"),
    ("train.batch_size=true", "override 'train.batch_size=true': train.batch_size: expected an integer, "
                              "got boolean true"),
    ("train.batch_size=2.0", "override 'train.batch_size=2.0': train.batch_size: expected an integer, got number 2.0"),
    ("train.lr=null", "override 'train.lr=null': train.lr: expected a number, got null"),
    ("model.backbone=null", "override 'model.backbone=null': model.backbone: expected a string, got null"),
    ("output.checkpoints=yes please", "override 'output.checkpoints=yes please': output.checkpoints: "
                                      "expected true or false, got string \"yes please\""),
    ("train=5", "override 'train=5': train: expected a mapping of keys, got integer 5"),
    ("tasks=[seg, seg, cls]", "override 'tasks=[seg, seg, cls]': tasks: duplicate task name(s) seg; every task "
                              "needs its own name"),
    ("tasks=[seg, 1, cls]", "override 'tasks=[seg, 1, cls]': tasks[1]: expected a string, got integer 1"),
    ("train.lr=0", "override 'train.lr=0': train.lr: must be > 0, got 0.0"),
    ("train.weight_decay=-1e-4", "override 'train.weight_decay=-1e-4': train.weight_decay: must be >= 0, got -0.0001"),
    ("data.image_size=4", "override 'data.image_size=4': data.image_size: must be >= 8, got 4"),
    ("data.channels=2", "override 'data.channels=2': data.channels: must be 1 (grey) or 3 (RGB), got 2"),
    ("train.iterations=0", "override 'train.iterations=0': train.iterations: must be >= 1, got 0"),
    ("domains.kind=cls", "config: domains: needs permute: N (tasks) or rotate: [DEGREES, ...]"),
    ("data.train_size=0", "override 'data.train_size=0': data.train_size: must be >= 1, got 0"),
    ("train.epochs.det=-1", "override 'train.epochs.det=-1': train.epochs.det: must be >= 0, got -1"),
    ("train.epochs=-2", "override 'train.epochs=-2': train.epochs.seg: must be >= 0, got -2"),
    ("train.epochs=2.5", "override 'train.epochs=2.5': train.epochs.seg: expected an integer, got number 2.5"),
    ("data.hue.cls=0.7", "override 'data.hue.cls=0.7': data.hue.cls: must be between 0 and 0.5 (turns of the colour "
                         "wheel), got 0.7"),
    ("eval.iou_threshold=1.5", "override 'eval.iou_threshold=1.5': eval.iou_threshold: must be between 0 and 1, "
                               "got 1.5"),
    ("train.optimizer=lion", "override 'train.optimizer=lion': train.optimizer: must be one of adam, adamw, sgd, "
                             "got \"lion\""),
    ("benchmark=coco", "override 'benchmark=coco': benchmark: must be one of shapes, files, got \"coco\""),
])
def test_override_errors_are_one_clear_line(override, message):
    assert error_of(overrides=[override]) == message


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=100"], "config: data.image_size: must be a multiple of 32 and >= 64 for model.backbone yolov8n, "
                              "got 100 (mlp and reduced_resnet18 take any size)"),
    (["data.image_size=32"], "config: data.image_size: must be a multiple of 32 and >= 64 for model.backbone yolov8n, "
                             "got 32 (mlp and reduced_resnet18 take any size)"),
    (["data.channels=1"], "config: data.channels: model.backbone yolov8n takes RGB images (channels 3); grey images "
                          "(1) are for mlp and reduced_resnet18"),
    (["data.image_size=28", "data.channels=1", "model.backbone=mlp"], None),
])
def test_the_unified_model_needs_rgb_images_of_a_multiple_of_32(overrides, message):
    config = load_config(None, overrides)
    if message is None:
        check_model_input(config)
        return
    with pytest.raises(ConfigError) as error:
        check_model_input(config)
    assert str(error.value) == message


def test_one_key_of_a_split_can_be_overridden_and_a_split_without_kind_is_refused(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("split: {kind: classification, data: {format: folder, root: a}, experiences: 2}\n")
    assert load_config(path, ["split.data.root=b"]).split.data.root == "b"
    with pytest.raises(ConfigError, match="split: needs kind"):
        load_config(None, ["split.experiences=2"])


def test_zero_epochs_are_allowed():
    assert load_config(None, ["train.epochs.seg=0"]).train.epochs.seg == 0


def test_error_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n  optimiser: sgd\n")
    assert error_of(path) == f"{path}: train.optimiser: unknown key; did you mean 'train.optimizer'?"


def test_bad_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\ntrain:\n  epochs: {seg: 1\nmodel: {}\n")
    assert error_of(path) == f"{path}:4:6: invalid YAML: expected ',' or '}}', but got ':'"


@pytest.mark.parametrize("text, line_column", [
    ('seed: !!python/object/apply:os.system ["touch {marker}"]\n', "1:7"),
    ('!!python/object/apply:subprocess.call [["touch", "{marker}"]]\n', "1:1"),
    ("train:\n  lr: !!python/object/new:builtins.float ['1e-3']\n", "2:7"),
    ("model: !!python/name:os.system\n", "1:8"),
])
def test_python_tags_in_a_file_are_refused_without_running_anything(tmp_path, text, line_column):
    marker = tmp_path / "ran"
    path = write(tmp_path, text.format(marker=marker))
    message = error_of(path)
    assert message.startswith(f"{path}:{line_column}: invalid YAML: could not determine a constructor for the tag "
                              "'tag:yaml.org,2002:python/")
    assert not marker.exists()


def test_a_python_tag_in_an_override_is_refused_without_running_anything(tmp_path):
    marker = tmp_path / "ran"
    override = f'seed=!!python/object/apply:os.system ["touch {marker}"]'
    assert error_of(None, [override]).startswith(f"override '{override}': invalid YAML: could not determine a "
                                                 "constructor for the tag 'tag:yaml.org,2002:python/object/apply")
    assert not marker.exists()


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- seed\n- 1\n")
    assert error_of(path) == f"{path}: top level: expected a mapping of keys, got list [\"seed\", 1]"


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"


def test_file_error_reported_before_overrides_apply(tmp_path):
    path = write(tmp_path, "train:\n  lr: -1\n")
    assert error_of(path, ["train.lr=0.1"]) == f"{path}: train.lr: must be > 0, got -1.0"


def test_backbone_choices_are_the_registry():
    from clmtl.config import BACKBONE_NAMES
    from clmtl.models.backbone import BACKBONES

    assert BACKBONE_NAMES == tuple(BACKBONES)


def test_precision_choices_are_what_the_precision_module_resolves():
    from clmtl.config import PRECISIONS
    from clmtl.training.precision import PRECISIONS as RESOLVED

    assert PRECISIONS == RESOLVED


def test_names_users_import_from_the_config_module_still_come_from_it():
    """Strategies written against earlier versions import their ``setting`` fields and ``ConfigError`` from
    ``clmtl.config``; those names are the ones of ``clmtl.settings`` and ``clmtl.errors``."""
    import clmtl
    import clmtl.config
    import clmtl.errors
    import clmtl.settings

    for name in ("setting", "rule", "one_of", "POSITIVE", "AT_LEAST_ONE", "NON_NEGATIVE", "FRACTION", "PER_EXPERIENCE",
                 "make_settings", "describe_settings", "search_space", "schema_defaults", "config_key"):
        assert getattr(clmtl.config, name) is getattr(clmtl.settings, name), name
    assert clmtl.config.ConfigError is clmtl.errors.ConfigError
    assert clmtl.setting is clmtl.settings.setting


def test_one_loader_checks_strategy_keys_against_the_registered_strategies_by_default():
    """``clmtl.load_config`` is ``clmtl.config.load_config``: a file, a dict or a ``Config``, and by default the
    registered strategies' settings (explicit ``strategies`` replace them, as the probes above do)."""
    import clmtl
    import clmtl.config

    assert clmtl.load_config is clmtl.config.load_config
    cfg = load_config(None, ["strategy.ewc.lambda=5"])
    assert cfg.strategy["ewc"]["lambda"] == 5.0 and cfg.strategy["ewc"]["mode"] == "separate"
    assert error_of(None, ["strategy.ewc.lamda=5"], strategies=None) == (
        "override 'strategy.ewc.lamda=5': strategy.ewc.lamda: unknown key; did you mean 'strategy.ewc.lambda'?")
    assert load_config({"strategy": {"ewc": {"lambda": 3}}}).strategy["ewc"]["lambda"] == 3.0
    assert load_config(cfg, ["seed=3"]).strategy == cfg.strategy
