"""Declared plugin state (``clmtl.training.plugin_state``): what a plugin declares is saved as tensors and plain
containers, loads with ``weights_only=True`` and comes back as it was; a tensor in an undeclared attribute, or a value a
checkpoint cannot hold, is refused in one line naming the plugin and the attribute."""
import io
import pickle
from collections import Counter, defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from avalanche.training.utils import ParamData
from torch import nn

from clmtl.training.plugin import Plugin, StateError, frozen_copy


@dataclass
class Memory:
    images: list
    head: int = 0


class Point(NamedTuple):
    x: torch.Tensor
    label: str


class Keeper(Plugin):
    state = ("tensor", "nested", "counts", "by_experience", "generator", "record", "point", "param", "inner.values")
    model_copies = ("teacher",)
    transient = ("cache",)

    def __init__(self) -> None:
        super().__init__()
        self.tensor = self.record = self.point = self.param = self.teacher = self.cache = None
        self.nested: dict = {}
        self.counts: Counter = Counter()
        self.by_experience: defaultdict = defaultdict(dict)
        self.generator = torch.Generator().manual_seed(0)
        self.inner = SimpleNamespace(values=[], size=3)
        self.setting = 0.5  # holds no tensor: needs no declaration


class Extended(Keeper):
    state = ("more",)

    def __init__(self) -> None:
        super().__init__()
        self.more = torch.zeros(2)


def saved_and_loaded(plugin: Plugin) -> dict:
    """``plugin.state_dict()`` through a checkpoint file loaded with weights only."""
    buffer = io.BytesIO()
    torch.save(plugin.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def filled(model: nn.Module) -> Keeper:
    """A ``Keeper`` holding a value of every kind, its teacher a copy of ``model``."""
    kept = Keeper()
    kept.tensor = torch.arange(4.0)
    kept.nested = {0: [torch.ones(2), (1, "a", None)], "x": {"y": 2.5}}
    kept.counts.update({1: 3})
    kept.by_experience[0]["w"] = torch.zeros(3)
    torch.rand(5, generator=kept.generator)
    kept.record = Memory([torch.ones(1)], head=2)
    kept.point = Point(torch.tensor([1.0]), "p")
    kept.param = ParamData("w", init_tensor=torch.full((2,), 7.0))
    kept.inner.values = [torch.tensor(5)]
    kept.teacher = frozen_copy(model)
    kept.cache = torch.ones(1)
    return kept


def test_declared_state_comes_back_through_a_weights_only_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    kept = filled(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the run's model has moved on since the copy

    fresh = Keeper()
    generator, counts, by_experience = fresh.generator, fresh.counts, fresh.by_experience
    fresh.load_state_dict(saved_and_loaded(kept), model)

    assert torch.equal(fresh.tensor, kept.tensor)
    assert torch.equal(fresh.nested[0][0], torch.ones(2)) and fresh.nested[0][1] == (1, "a", None)
    assert fresh.nested["x"] == {"y": 2.5}
    assert fresh.counts is counts and fresh.counts == Counter({1: 3})  # restored into the plugin's own Counter
    assert fresh.by_experience is by_experience and fresh.by_experience[5] == {}  # still a defaultdict
    assert torch.equal(fresh.by_experience[0]["w"], torch.zeros(3))
    assert fresh.generator is generator and torch.equal(torch.rand(3, generator=generator),
                                                        torch.rand(3, generator=kept.generator))
    assert isinstance(fresh.record, Memory) and fresh.record.head == 2 and torch.equal(fresh.record.images[0],
                                                                                      torch.ones(1))
    assert isinstance(fresh.point, Point) and fresh.point.label == "p" and torch.equal(fresh.point.x, kept.point.x)
    assert isinstance(fresh.param, ParamData) and fresh.param.name == "w"
    assert torch.equal(fresh.param.data, torch.full((2,), 7.0))
    assert fresh.inner.size == 3 and torch.equal(fresh.inner.values[0], torch.tensor(5))
    assert fresh.cache is None  # transient: never saved
    teacher = fresh.teacher
    assert teacher is not model and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for (name, value), (_, copied) in zip(teacher.state_dict().items(), kept.teacher.state_dict().items()):
        assert torch.equal(value, copied), name  # the saved copy's weights, not the model's
    assert not torch.equal(teacher[0].weight, model[0].weight)


def test_torchrun_hands_rank_0s_declared_state_to_every_other_process(monkeypatch):
    from avalanche.distributed import DistributedHelper
    from bitwise import same

    from clmtl.training import distributed
    from clmtl.training.checkpoint import plugin_states

    model = nn.Linear(3, 4)
    rank_0, other = filled(model), Keeper()
    sent = pickle.dumps(plugin_states([rank_0]))  # what rank 0 broadcasts
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    monkeypatch.setattr(DistributedHelper, "broadcast_object", lambda obj: pickle.loads(sent))
    distributed.broadcast_plugin_states([other], model)
    assert same(other.state_dict(), rank_0.state_dict()) and other.cache is None


def test_a_subclass_adds_to_its_bases_declarations():
    plugin = Extended()
    assert set(plugin.state_dict()) == {*Keeper.state, "more", "teacher"}


@pytest.mark.parametrize("attribute,value,path,held", [
    ("seen", [torch.ones(1)], "'seen[0]'", "a tensor"),
    ("copy", nn.Linear(1, 1), "'copy'", "a module"),
    ("draws", torch.Generator(), "'draws'", "a random generator"),
    ("buffer", SimpleNamespace(rows={"x": torch.ones(1)}), "\"buffer.rows['x']\"", "a tensor"),
    ("inner", SimpleNamespace(values=[], extra=torch.ones(1)), "'inner.extra'", "a tensor"),
])
def test_a_tensor_in_an_undeclared_attribute_is_refused_naming_the_plugin_and_the_attribute(attribute, value, path,
                                                                                             held):
    plugin = Keeper()
    setattr(plugin, attribute, value)
    with pytest.raises(StateError) as refused:
        plugin.state_dict()
    assert str(refused.value) == (f"plugin Keeper holds {held} in {path}, which it does not declare: name it in "
                                  "Keeper.state (kept by checkpoints, --resume and torchrun) or Keeper.transient "
                                  "(rebuilt, never saved)")


@pytest.mark.parametrize("value,message", [
    ({1, 2}, "plugin Keeper: 'tensor' holds a set, which a checkpoint cannot hold"),
    ([np.zeros(2)], "plugin Keeper: 'tensor[0]' holds a ndarray, which a checkpoint cannot hold"),
    ({"__clmtl_state__": 1}, "plugin Keeper: 'tensor' is a dict with the key '__clmtl_state__'"),
    ([Counter()], "plugin Keeper: 'tensor[0]' is a Counter inside another value, which would come back as a plain"),
    ({np.int64(1): 2}, "plugin Keeper: 'tensor' has a key of type int64: keys are numbers or strings"),
    (np.float64(0.5), "plugin Keeper: 'tensor' holds a float64, which a checkpoint cannot hold"),
])
def test_a_declared_value_a_checkpoint_cannot_hold_is_refused_in_one_line(value, message):
    plugin = Keeper()
    plugin.tensor = value
    with pytest.raises(StateError, match="^" + message.replace("[", r"\[").replace("]", r"\]")) as refused:
        plugin.state_dict()
    assert "\n" not in str(refused.value)


def test_a_declared_attribute_the_plugin_lacks_and_a_state_without_it_are_errors():
    plugin = Keeper()
    del plugin.counts
    with pytest.raises(StateError, match="^plugin Keeper declares 'counts', an attribute it does not have$"):
        plugin.state_dict()
    state = Keeper().state_dict()
    del state["teacher"]
    with pytest.raises(StateError, match="^the saved state of plugin Keeper has no 'teacher'"):
        Keeper().load_state_dict(state, nn.Linear(1, 1))


def test_a_plugin_that_cannot_resume_saves_nothing_and_says_why_at_resume():
    from clmtl.training.checkpoint import ResumeError, restore_plugins

    class Datasets(Plugin):
        no_resume = "its memory is datasets"

        def __init__(self) -> None:
            super().__init__()
            self.memory = [torch.ones(1)]  # not checked: nothing of it is saved

    plugin = Datasets()
    assert plugin.state_dict() is None
    with pytest.raises(ResumeError, match="^plugin Datasets cannot be resumed: its memory is datasets$"):
        restore_plugins([plugin], [None], nn.Linear(1, 1))


LEAKY = '''
from clmtl.training.plugin import Plugin
from clmtl.training.registry import register


@register("leaky")
class Leaky(Plugin):
    def after_training_exp(self, strategy, **kwargs):
        self.seen = [p.detach().clone() for p in strategy.model.parameters()]
'''


def test_a_run_whose_plugin_holds_undeclared_tensors_stops_at_its_first_checkpoint_in_one_line(
        tmp_path, isolated_registry, clmtl_cli, monkeypatch):
    monkeypatch.delenv("CLMTL_DEBUG", raising=False)
    (tmp_path / "leaky.py").write_text(LEAKY)
    out = tmp_path / "run"
    result = clmtl_cli("run", "--plugin-file", str(tmp_path / "leaky.py"), "--strategy", "leaky", "--no-baselines",
                       "--out", str(out), "data.train_size=4", "data.val_size=2", "data.image_size=64",
                       "train.epochs=1", "train.batch_size=2", "output.overlays=0", "train.threads=1")
    assert result.returncode == 2
    assert result.stderr == ("clmtl: error: plugin Leaky holds a tensor in 'seen[0]', which it does not declare: name "
                             "it in Leaky.state (kept by checkpoints, --resume and torchrun) or Leaky.transient "
                             "(rebuilt, never saved)\n")
    assert list((out / "checkpoints").iterdir()) == [] and not (out / "results.json").exists()
