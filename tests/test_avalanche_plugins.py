"""Avalanche's own plugins by name (``strategies/avalanche_stock.py``): their settings are Avalanche's parameters,
they compose and are listed like clmtl's, a stream they cannot handle is refused before training, and each one trains
for real on a tiny stream of classification tasks and does what it is for."""
import collections
import inspect
import re
from types import SimpleNamespace

import pytest
import torch
from avalanche.training import plugins as avalanche_plugins
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import Dataset

from clmtl.builders import build_model, build_strategy, make_template
from clmtl.training.seeding import seed_everything
from clmtl.cli import main
from clmtl.config import load_config
from clmtl.data.transforms import train_augmentation
from clmtl.errors import ConfigError
from clmtl.strategies.avalanche_stock import AGEM, GEM, MAS, SI, GDumb, RWalk
from clmtl.strategies.ewc import MultiTaskEWCPlugin
from clmtl.stream.benchmark import build_benchmark
from clmtl.stream.experiences import class_labels
from clmtl.stream.scenario import plan_stream
from clmtl.stream.tasks import TaskSpec
from clmtl.training.registry import available, build_plugins, check_stream, parse_strategy, register, strategy_schemas

STOCK = {"avalanche.SynapticIntelligence": (avalanche_plugins.SynapticIntelligencePlugin, ("loss",)),
         "avalanche.MAS": (avalanche_plugins.MASPlugin, ("loss",)),
         "avalanche.GEM": (avalanche_plugins.GEMPlugin, ("gradient",)),
         "avalanche.AGEM": (avalanche_plugins.AGEMPlugin, ("gradient",)),
         "avalanche.RWalk": (avalanche_plugins.RWalkPlugin, ("loss",)),
         "avalanche.GDumb": (avalanche_plugins.GDumbPlugin, ("model", "data"))}
CLASSES = ("[heart, arrow]", "[semicircle, l_shape]", "[frame, heart]")
TINY = ["data.image_size=64", "data.train_size=8", "data.val_size=4", "train.batch_size=4", "train.ema=0",
        "train.warmup=0", "train.threads=1"]


def stream_config(tmp_path, scenario="class", tasks=2, overrides=()):
    """``tasks`` shapes classification tasks of two classes, 8 training images each (2 mini-batches of 4)."""
    entries = "".join(f"  - {{name: t{i}, kind: cls, data: {{format: shapes, classes: {CLASSES[i]}}}}}\n"
                      for i in range(tasks))
    path = tmp_path / "stream.yaml"
    path.write_text(f"scenario: {scenario}\ntasks:\n{entries}")
    return load_config(path, [*TINY, *overrides], strategies=strategy_schemas())


def trained(config, strategy, before=(), after=(), epochs=(1, 1), stop_after=None):
    """Train ``strategy`` (with probe plugins around it) on the stream, experience by experience."""
    seed_everything(0)
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks)
    plugins = build_strategy(strategy, config, benchmark)
    template = make_template(config, model, benchmark.tasks, [*before, *plugins, *after], [], progress=False)
    for index, experience in enumerate(benchmark.stream.train_stream):
        template.train_for(experience, epochs[index] if index < len(epochs) else 1)
        if stop_after == index:
            break
    return SimpleNamespace(plugin=plugins[0], template=template, model=model, benchmark=benchmark)


class Recorder(SupervisedPlugin):
    """Records ``what(strategy)`` at one callback, with the experience it happened in."""

    def __init__(self, callback, what):
        super().__init__()
        self.seen = []
        setattr(self, callback, lambda strategy, **kwargs: self.seen.append(
            (strategy.clock.train_exp_counter, what(strategy))))

    def during(self, experience):
        return [value for exp, value in self.seen if exp == experience]


def plugin_of(strategy, plugin_class):
    return next(plugin for plugin in strategy.plugins if isinstance(plugin, plugin_class))


def flat_grad(strategy):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in strategy.model.parameters()]).clone()


# ---------------------------------------------------------------------------------------- names and settings

@pytest.mark.parametrize("name", sorted(STOCK))
def test_settings_are_the_avalanche_plugins_parameters_with_its_defaults(name):
    plugin_class, acts_on = STOCK[name]
    entry = available()[name]
    parameters = [p for p in inspect.signature(plugin_class.__init__).parameters.values() if p.name != "self"]
    assert list(entry.defaults) == [p.name for p in parameters]
    for parameter in parameters:
        if parameter.default is not inspect.Parameter.empty:
            assert entry.defaults[parameter.name] == parameter.default, parameter.name
    assert entry.acts_on == acts_on and entry.kinds == ("classification",)
    (plugin,) = build_plugins(name)
    assert isinstance(plugin, plugin_class)


def test_dotted_names_take_overrides_and_yaml_and_suggest_on_a_typo(tmp_path):
    name = "avalanche.SynapticIntelligence"
    config = load_config(None, [f"strategy.{name}.si_lambda=0.5"], strategies=strategy_schemas())
    assert config.strategy[name] == {"si_lambda": 0.5, "eps": 1e-7, "excluded_parameters": None,
                                     "device": "as_strategy"}
    path = tmp_path / "c.yaml"
    path.write_text("strategy:\n  avalanche.GEM: {memory_strength: 1}\n  avalanche:\n    AGEM: {sample_size: 8}\n")
    config = load_config(path, strategies=strategy_schemas())
    assert config.strategy["avalanche.GEM"]["memory_strength"] == 1.0
    assert config.strategy["avalanche.AGEM"] == {"patterns_per_experience": 256, "sample_size": 8}
    assert load_config(None, base=config.to_dict(), strategies=strategy_schemas()).strategy == config.strategy
    with pytest.raises(ConfigError, match=re.escape(
            "override 'strategy.avalanche.SynapticInteligence.si_lambda=1': strategy.avalanche.SynapticInteligence: "
            "unknown strategy; did you mean 'strategy.avalanche.SynapticIntelligence'?")):
        load_config(None, ["strategy.avalanche.SynapticInteligence.si_lambda=1"], strategies=strategy_schemas())
    with pytest.raises(ConfigError, match=re.escape("strategy.avalanche.SynapticIntelligence.si_lambda: must be >= 0")):
        load_config(None, [f"strategy.{name}.si_lambda=[1, -1]"], strategies=strategy_schemas())
    (plugin,) = build_plugins(name, {name: {"si_lambda": [0.5, 2]}})
    assert plugin.si_lambda == [0.5, 2.0]


def test_clmtl_strategies_lists_them_with_their_parameters(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "avalanche.GEM: Avalanche's GEM" in out and "acts on: gradient" in out
    assert "strategy.avalanche.GEM.patterns_per_experience = 256 (int, must be >= 1)" in out
    assert "strategy.avalanche.RWalk.delta_t = 10 (int, must be >= 1)" in out
    classification_only, name = set(), None
    for line in out.splitlines():  # a strategy's name starts a line, its details are indented under it
        if line and not line[0].isspace():
            name = line.split(":")[0]
        elif "handles: classification tasks only" in line:
            classification_only.add(name)
    assert {name for name in classification_only if name.startswith("avalanche.")} == set(STOCK)
    assert "er_ace" in classification_only and not {"der", "derpp"} & classification_only


def test_they_compose_with_clmtls_strategies_and_clash_where_both_take_over_a_part():
    assert parse_strategy("avalanche.AGEM+lwf") == ["lwf", "avalanche.AGEM"]  # loss terms before gradient changes
    assert parse_strategy("lwf+avalanche.GDumb") == ["avalanche.GDumb", "lwf"]
    plugins = build_plugins("avalanche.SynapticIntelligence+ewc", {"avalanche.SynapticIntelligence": {"si_lambda": 3}})
    assert [type(p) for p in plugins] == [SI, MultiTaskEWCPlugin]  # SI: Avalanche's plugin, only named
    assert plugins[0].si_lambda == [3.0]
    with pytest.raises(ValueError, match="cannot compose avalanche.GEM and avalanche.AGEM: each takes over the "
                                         "gradient"):
        parse_strategy("avalanche.GEM+avalanche.AGEM")
    with pytest.raises(ValueError, match="cannot compose replay and avalanche.GDumb: each takes over the data"):
        parse_strategy("replay+avalanche.GDumb")


# ------------------------------------------------------------------------------------------------ refusals

def test_a_stream_with_other_kinds_is_refused_before_training_in_one_line(tmp_path, capsys):
    tasks = plan_stream([TaskSpec("seg", "segmentation", ("bg", "disk")), TaskSpec("c", "classification", ("a", "b"))],
                        "task")
    config = load_config(None, strategies=strategy_schemas())
    with pytest.raises(ConfigError, match=r"^strategy avalanche.GEM handles classification tasks only; task 'seg' is "
                                          r"segmentation$"):
        build_strategy("lwf+avalanche.GEM", config, SimpleNamespace(tasks=tasks))
    out = tmp_path / "out"
    code = main(["run", "--strategy", "ewc+avalanche.MAS", "--out", str(out), "--no-baselines", *TINY,
                 "tasks=[det, cls]"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err == ("clmtl: error: strategy avalanche.MAS handles classification tasks only; task "
                                       "'det' is detection\n")


def test_gdumb_needs_every_task_in_one_head():
    tasks = [TaskSpec("d01", "classification", ("0", "1")), TaskSpec("d23", "classification", ("2", "3"))]
    check_stream("avalanche.GDumb", plan_stream(tasks, "class"))
    with pytest.raises(ConfigError, match="^strategy avalanche.GDumb trains on mini-batches that mix every task's "
                                          "samples, which one head must take; tasks 'd01' and 'd23' have heads 0 and 1 "
                                          r"\(scenario task\): use scenario class or domain$"):
        check_stream("naive+avalanche.GDumb", plan_stream(tasks, "task"))


def test_a_users_strategy_declares_the_kinds_it_handles_and_a_check(isolated_registry):
    checked = []
    register("probe_seg_only", kinds=("seg",))(lambda: None)
    register("probe_checked", check=lambda name, tasks: checked.append((name, [t.name for t in tasks])))(
        lambda: None)
    tasks = [TaskSpec("s", "segmentation", ("bg", "disk")), TaskSpec("d", "detection", ("star",))]
    check_stream("probe_checked", tasks)
    assert checked == [("probe_checked", ["s", "d"])]
    with pytest.raises(ConfigError, match="^strategy probe_seg_only handles segmentation tasks only; task 'd' is "
                                          "detection$"):
        check_stream("probe_seg_only", tasks)
    with pytest.raises(ValueError, match=r"strategy 'probe_bad': kinds must be some of .*got \['boxes'\]"):
        register("probe_bad", kinds=("boxes",))


# ------------------------------------------------------------------------------------------- stream targets

def test_classification_experiences_carry_their_targets_in_head_labels(tmp_path):
    config = stream_config(tmp_path, overrides=["tasks=[seg, {name: c, kind: cls, data: {format: shapes, "
                                                "classes: [arrow, frame]}}]", "scenario=class"])
    seg, cls = build_benchmark(config).stream.train_stream
    assert not hasattr(seg.dataset, "targets")  # label maps are no class label
    assert list(cls.dataset.targets) == [int(cls.dataset[i][1]) for i in range(len(cls.dataset))]
    assert set(cls.dataset.targets) == {0, 1}
    config = stream_config(tmp_path)  # class scenario: the second task's classes are 2 and 3 of the shared head
    _, second = build_benchmark(config).stream.train_stream
    assert sorted(set(second.dataset.targets)) == [2, 3]


def test_class_labels_are_read_without_loading_images():
    class NoImages(Dataset):
        targets = [1, 0, 1]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            raise AssertionError("an image was loaded")

    assert class_labels(train_augmentation(NoImages(), "classification", hflip=0.5)) == [1, 0, 1]


# ------------------------------------------------------------------------------------------ trained for real

def loss_probes():
    """Loss before and after the strategy's before_backward: what its term adds."""
    return (Recorder("before_backward", lambda s: float(s.loss.detach())),
            Recorder("before_backward", lambda s: float(s.loss.detach())))


def test_synaptic_intelligence_importance_and_penalty(tmp_path):
    before, after = loss_probes()
    batches = Recorder("after_forward", lambda s: (tuple(s.mb_output.shape), s.mb_y.dtype, s.mb_y.tolist()))
    run = trained(stream_config(tmp_path), "avalanche.SynapticIntelligence", before=[before, batches], after=[after],
                  epochs=(1, 2))
    assert batches.during(0)[0][:2] == ((4, 2), torch.long) and set(batches.during(1)[0][2]) <= {2, 3}
    assert batches.during(1)[0][0] == (4, 4)  # one logits tensor over the grown head's classes
    importance = torch.cat([p.data for p in run.plugin.ewc_data[1].values()])
    assert importance.abs().sum() > 0
    added = [a - b for (_, a), (_, b) in zip(after.seen, before.seen)]
    assert isinstance(run.plugin, avalanche_plugins.SynapticIntelligencePlugin) and len(added) == 6
    assert added[:2] == [0.0, 0.0]  # no importance before the first experience ended
    assert added[2] == pytest.approx(0.0, abs=1e-12)  # first step of the second: still at the anchor
    assert all(abs(term) > 0 for term in added[3:])


def test_mas_importance_penalty_and_batchnorm_statistics_untouched(tmp_path):
    before, after = loss_probes()
    stats = lambda s: {n: b.clone() for n, b in s.model.named_buffers() if "running" in n}  # noqa: E731
    stats_before, stats_after = Recorder("after_training_exp", stats), Recorder("after_training_exp", stats)
    run = trained(stream_config(tmp_path, "task"), "avalanche.MAS", before=[before, stats_before],
                  after=[after, stats_after], epochs=(1, 2))
    assert isinstance(run.plugin, MAS) and sum(float(v.data.sum()) for v in run.plugin.importance.values()) > 0
    for (_, old), (_, new) in zip(stats_before.seen, stats_after.seen):
        assert all(torch.equal(old[name], new[name]) for name in old)  # the importance pass left them alone
    added = [a - b for (_, a), (_, b) in zip(after.seen, before.seen)]
    assert added[:3] == [0.0, 0.0, 0.0] and all(term > 0 for term in added[3:])


def test_gem_keeps_its_patterns_and_projects_the_gradient_onto_the_memories_side(tmp_path):
    raw = Recorder("after_backward", flat_grad)
    projected = Recorder("after_backward", lambda s: (flat_grad(s), plugin_of(s, GEM).G.clone()))
    run = trained(stream_config(tmp_path, overrides=["strategy.avalanche.GEM.patterns_per_experience=6"]),
                  "avalanche.GEM", before=[raw], after=[projected], epochs=(1, 2))
    gem = run.plugin
    assert isinstance(gem, GEM)
    assert gem.memory_x[0].shape[0] == gem.memory_y[0].shape[0] == 6
    assert gem.memory_tid[0].tolist() == [0] * 6 and set(gem.memory_y[0].tolist()) <= {0, 1}
    conflicts = 0
    for g, (v, memories) in zip(raw.during(1), projected.during(1)):
        (m,), g = memories.double(), g.double()  # one earlier experience: one memory gradient
        if m @ g >= 0:
            assert torch.equal(v, g.float())  # no conflict: the gradient as it was
            continue
        conflicts += 1
        # Avalanche's quadratic program with one constraint, in closed form: v = g + w m, its dual weight w the
        # larger of the margin (memory_strength) and -(m·g) / (m·m + 1e-3), the ridge it adds to m·m; with that
        # ridge m·v is m·g 1e-3 / (m·m + 1e-3), a hair below zero
        weight = max(gem.memory_strength, float(-(m @ g) / (m @ m + 1e-3)))
        torch.testing.assert_close(v.double(), g + weight * m, rtol=1e-5, atol=1e-7)
    assert conflicts  # the projection had something to do


def test_agem_memory_of_each_task_through_its_own_head_and_projection(tmp_path):
    config = stream_config(tmp_path, "task", 3, ["strategy.avalanche.AGEM.patterns_per_experience=6",
                                                 "strategy.avalanche.AGEM.sample_size=4"])
    raw = Recorder("after_backward", lambda s: (flat_grad(s), plugin_of(s, AGEM).reference_gradients.clone()))
    projected = Recorder("after_backward", flat_grad)
    run = trained(config, "avalanche.AGEM", before=[raw], after=[projected], epochs=(1, 2, 1))
    agem = run.plugin
    assert isinstance(agem, AGEM) and [len(buffer) for buffer in agem.buffers] == [6, 6, 6]
    assert list(agem.buffers[0].targets_task_labels) == [0] * 6
    conflicts = 0
    for (g, reference), v in zip(raw.during(1) + raw.during(2), projected.during(1) + projected.during(2)):
        conflicts += bool(g @ reference < 0)
        assert v @ reference >= -1e-5 * reference.norm() * v.norm()
    assert conflicts
    offsets, start = {}, 0
    for name, param in run.model.named_parameters():
        offsets[name] = slice(start, start + param.numel())
        start += param.numel()
    for _, reference in raw.during(2):  # the memory sample held both earlier tasks, each through its head
        assert reference[offsets["head.outputs.0.weight"]].abs().sum() > 0
        assert reference[offsets["head.outputs.1.weight"]].abs().sum() > 0
        assert reference[offsets["head.outputs.2.weight"]].abs().sum() == 0


def test_rwalk_scores_penalties_and_the_model_trains_in_train_mode(tmp_path):
    before, after = loss_probes()
    modes = Recorder("before_forward", lambda s: all(m.training for m in s.model.modules()))
    run = trained(stream_config(tmp_path, overrides=["strategy.avalanche.RWalk.delta_t=1"]), "avalanche.RWalk",
                  before=[before, modes], after=[after], epochs=(1, 2))
    scores = torch.cat([p.data.flatten() for p in run.plugin.exp_scores.values()])
    penalties = torch.cat([p.data.flatten() for p in run.plugin.exp_penalties.values()])
    assert isinstance(run.plugin, RWalk) and scores.abs().sum() > 0
    assert penalties.isfinite().all() and penalties.sum() > 0
    assert all(mode for _, mode in modes.seen)  # its gradient pass runs in eval mode, the training step does not
    added = [a - b for (_, a), (_, b) in zip(after.seen, before.seen)]
    assert added[:3] == [0.0, 0.0, 0.0] and all(term > 0 for term in added[3:])


def test_rwalk_penalties_are_finite_when_no_score_window_closed(tmp_path):
    run = trained(stream_config(tmp_path), "avalanche.RWalk", stop_after=0)  # 2 iterations, delta_t 10
    penalties = torch.cat([p.data.flatten() for p in run.plugin.exp_penalties.values()])
    assert penalties.isfinite().all() and penalties.sum() > 0


def test_gdumb_retrains_the_same_model_from_its_start_on_a_class_balanced_memory(tmp_path):
    data = Recorder("before_training_epoch", lambda s: collections.Counter(int(t) for t in s.adapted_dataset.targets))
    start = Recorder("before_training_epoch",
                     lambda s: {k: v.clone() for k, v in s.model.backbone.state_dict().items()})
    run = trained(stream_config(tmp_path, overrides=["strategy.avalanche.GDumb.mem_size=8"]), "avalanche.GDumb",
                  before=[data, start])
    assert isinstance(run.plugin, GDumb) and run.template.model is run.model  # the run's model is the one trained
    assert data.during(0) == [{0: 4, 1: 4}] and data.during(1) == [{0: 2, 1: 2, 2: 2, 3: 2}]
    (first,), (second,) = start.during(0), start.during(1)
    assert all(torch.equal(first[name], second[name]) for name in first)  # back to the initial weights
    assert run.model.num_classes(0) == 4
