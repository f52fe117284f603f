"""A plugin's declared state, saved and restored without a ``state_dict`` / ``load_state_dict`` of its own.

``clmtl.training.plugin.Plugin`` names three kinds of attributes (each class adds to its bases' names; a dotted name
such as ``buffer.tasks`` is an attribute of an attribute):

- ``state``: what carries over from one experience to the next, and inside one for a run stopped there. Run
  checkpoints save it, ``--resume`` restores it, and under torchrun rank 0 hands it to every process;
- ``model_copies``: frozen copies of the run's model (``frozen_copy``), or None: saved as their state dict, rebuilt
  from the run's model when restored (LwF's teacher);
- ``transient``: attributes that hold tensors but are no state: caches the plugin rebuilds from its state, working
  values of a step or an experience. They are neither saved nor restored.

``saved_state`` first refuses, in one line naming the plugin and the attribute, a plugin that holds a tensor, a module
or a random generator (also inside lists, tuples, dicts and objects) in an attribute none of these names, so state
cannot be lost silently. It then turns each value into tensors and plain containers, so checkpoints still load with
``weights_only=True``: numbers, strings, None, tensors, and lists, tuples and dicts of them as they are; what needs
more is saved as a dict tagged with ``KIND``:

- a tensor on an accelerator: restored on the device of the run's model (one on the CPU stays there);
- a ``torch.Generator``: its state, set back into the generator the attribute holds;
- an Avalanche ``ParamData`` (the stock plugins' and EWC's per-parameter tensors): its name and tensor;
- a dataclass or named tuple: its class, found among the modules already imported, and its fields.

A dict attribute, such as a ``defaultdict`` or a ``Counter``, is restored into the dict the plugin holds, so it keeps
its type (inside another value one is refused: it would come back a plain dict); any other value replaces the
attribute's. Restoring happens in a freshly built plugin, or after an
experience under torchrun; a run resumed inside an experience restores the state after the plugins'
``before_training_exp``, so caches are best built where they are used.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from collections import OrderedDict
from typing import Any

import torch
from avalanche.training.utils import ParamData
from torch import nn

KIND = "__clmtl_state__"
"""The key of a dict that stands for a value of its own kind (a generator, a ParamData, a record...)."""
DECLARATIONS = ("state", "model_copies", "transient")


class StateError(ValueError):
    """A plugin's state cannot be saved or restored as declared; the message names the plugin and the attribute."""


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose parameters take no gradient: what ``model_copies`` hold and rebuild."""
    copied = copy.deepcopy(model).eval()
    copied.requires_grad_(False)
    return copied


def declared(plugin_class: type, kind: str) -> tuple[str, ...]:
    """The names ``plugin_class`` and its bases declare as ``kind`` (one of ``DECLARATIONS``), bases first."""
    names: list[str] = []
    for klass in reversed(plugin_class.__mro__):
        names += [name for name in vars(klass).get(kind, ()) if name not in names]
    return tuple(names)


def _parent(plugin: Any, name: str) -> tuple[Any, str]:
    """The object holding the attribute ``name`` (dotted: of an attribute) and its last part."""
    *path, last = name.split(".")
    owner = plugin
    for part in path:
        owner = getattr(owner, part)
    return owner, last


def _get(plugin: Any, name: str) -> Any:
    owner, last = _parent(plugin, name)
    if not hasattr(owner, last):
        raise StateError(f"plugin {type(plugin).__name__} declares {name!r}, an attribute it does not have")
    return getattr(owner, last)


def _holds(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return "a tensor"
    if isinstance(value, nn.Module):
        return "a module"
    if isinstance(value, torch.Generator):
        return "a random generator"
    return None


def _walkable(value: Any) -> bool:
    """An object whose attributes the check looks into: not a class, function or module."""
    return hasattr(value, "__dict__") and not isinstance(value, (type, type(sys), type(_holds), type(len)))


def undeclared(plugin: Any) -> tuple[str, str] | None:
    """The first attribute path (``buffer.tasks[0]``) outside the declared names that holds a tensor, a module or a
    random generator, and which of these; None when there is none."""
    names = {name for kind in DECLARATIONS for name in declared(type(plugin), kind)}
    seen: set[int] = set()

    def walk(value: Any, path: str) -> tuple[str, str] | None:
        if path in names:
            return None
        held = _holds(value)
        if held is not None:
            return path, held
        if id(value) in seen:
            return None
        seen.add(id(value))
        if isinstance(value, dict):
            items = ((f"{path}[{key!r}]", item) for key, item in value.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
        elif _walkable(value):
            items = ((f"{path}.{key}", item) for key, item in vars(value).items())
        else:
            return None
        for item_path, item in items:
            found = walk(item, item_path)
            if found is not None:
                return found
        return None

    seen.add(id(plugin))
    for key, value in vars(plugin).items():
        found = walk(value, key)
        if found is not None:
            return found
    return None


def _record_class(path: str) -> type:
    module_name, _, qualname = path.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    is_record = isinstance(found, type) and (dataclasses.is_dataclass(found) or
                                             (issubclass(found, tuple) and hasattr(found, "_fields")))
    if not is_record:
        raise StateError(f"the state names a record class {path}, which is no dataclass or named tuple imported here")
    return found


PLAIN = (bool, int, float, str, type(None))
"""The types a value (or a dict key) is kept as it is; their subclasses (an ``IntEnum``, NumPy's ``float64``) would
not load with ``weights_only=True``."""


def encode(value: Any, where: str, nested: bool = False) -> Any:
    """``value`` as tensors and plain containers (module docstring); ``where``, its attribute path, names it in
    errors; ``nested``: inside another value."""
    record = type(value)
    if record in PLAIN:
        return value
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "cpu" else {KIND: "accelerator", "tensor": value}
    if isinstance(value, torch.Generator):
        return {KIND: "generator", "state": value.get_state()}
    if isinstance(value, ParamData):
        return {KIND: "param", "name": value.name, "tensor": encode(value.data, where, True)}
    if record in (list, tuple):
        return record(encode(item, f"{where}[{index}]", True) for index, item in enumerate(value))
    if isinstance(value, dict):
        if nested and record not in (dict, OrderedDict):
            raise StateError(f"{where!r} is a {record.__name__} inside another value, which would come back as a "
                             "plain dict: hold it in an attribute of its own")
        if KIND in value:
            raise StateError(f"{where!r} is a dict with the key {KIND!r}, which the state keeps for itself")
        odd = [key for key in value if type(key) not in PLAIN]
        if odd:
            raise StateError(f"{where!r} has a key of type {type(odd[0]).__name__}: keys are numbers or strings")
        return {key: encode(item, f"{where}[{key!r}]", True) for key, item in value.items()}
    if dataclasses.is_dataclass(value) or (isinstance(value, tuple) and hasattr(record, "_fields")):
        fields = ([f.name for f in dataclasses.fields(value) if f.init] if dataclasses.is_dataclass(value)
                  else list(record._fields))
        if dataclasses.is_dataclass(value) and len(fields) != len(dataclasses.fields(value)):
            raise StateError(f"{where!r} is a {record.__name__} with fields its constructor does not take")
        return {KIND: "record", "class": f"{record.__module__}:{record.__qualname__}",
                "fields": {name: encode(getattr(value, name), f"{where}.{name}", True) for name in fields}}
    raise StateError(f"{where!r} holds a {record.__name__}, which a checkpoint cannot hold: declare tensors, numbers, "
                     "strings, None, lists, tuples and dicts of them, dataclasses, named tuples or torch.Generators")


def decode(saved: Any, device: torch.device) -> Any:
    """The value ``encode`` saved, tensors from an accelerator on ``device``."""
    if isinstance(saved, list):
        return [decode(item, device) for item in saved]
    if isinstance(saved, tuple):
        return tuple(decode(item, device) for item in saved)
    if not isinstance(saved, dict):
        return saved
    kind = saved.get(KIND)
    if kind is None:
        return {key: decode(item, device) for key, item in saved.items()}
    if kind == "accelerator":
        return saved["tensor"].to(device)
    if kind == "generator":
        generator = torch.Generator()
        generator.set_state(saved["state"])
        return generator
    if kind == "param":
        tensor = decode(saved["tensor"], device)
        return ParamData(saved["name"], init_tensor=tensor, device=tensor.device)
    if kind == "record":
        return _record_class(saved["class"])(**{name: decode(item, device) for name, item in saved["fields"].items()})
    raise StateError(f"the state holds a value of unknown kind {kind!r}")


def saved_state(plugin: Any) -> dict[str, Any]:
    """Every declared attribute of ``plugin`` as tensors and plain containers, after refusing undeclared tensors."""
    name = type(plugin).__name__
    found = undeclared(plugin)
    if found is not None:
        path, held = found
        raise StateError(f"plugin {name} holds {held} in {path!r}, which it does not declare: name it in {name}.state "
                         f"(kept by checkpoints, --resume and torchrun) or {name}.transient (rebuilt, never saved)")
    values = {key: _get(plugin, key) for key in declared(type(plugin), "state")}
    copies = {key: _get(plugin, key) for key in declared(type(plugin), "model_copies")}
    for key, module in copies.items():
        if module is not None and not isinstance(module, nn.Module):
            raise StateError(f"plugin {name}: model copy {key!r} holds a {type(module).__name__}, not a module")
    try:
        return {**{key: encode(value, key) for key, value in values.items()},
                **{key: None if module is None else encode(module.state_dict(), key) for key, module in copies.items()}}
    except StateError as error:
        raise StateError(f"plugin {name}: {error}") from None


def restore_state(plugin: Any, state: dict[str, Any], model: nn.Module) -> None:
    """Put back what ``saved_state`` returned; ``model`` is the run's model, already restored."""
    name = type(plugin).__name__
    missing = [key for kind in ("state", "model_copies") for key in declared(type(plugin), kind) if key not in state]
    if missing:
        raise StateError(f"the saved state of plugin {name} has no {', '.join(map(repr, missing))}: it was saved "
                         "by another version of the plugin")
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    for key in declared(type(plugin), "state"):
        owner, last = _parent(plugin, key)
        current, value = getattr(owner, last, None), decode(state[key], device)
        if isinstance(current, torch.Generator) and isinstance(value, torch.Generator):
            current.set_state(value.get_state())  # the plugin's own generator, on its own device
        elif isinstance(current, dict) and isinstance(value, dict):
            current.clear()  # a defaultdict or Counter stays one
            current.update(value)
        else:
            setattr(owner, last, value)
    for key in declared(type(plugin), "model_copies"):
        owner, last = _parent(plugin, key)
        rebuilt = None
        if state[key] is not None:  # a copy saved before the model had some parts (a continued run's new heads)
            rebuilt = frozen_copy(model)  # takes the model's values for them, as a copy made then would have
            unexpected = rebuilt.load_state_dict(decode(state[key], device), strict=False).unexpected_keys
            if unexpected:
                raise StateError(f"plugin {name}: model copy {key!r} holds tensors the model does not have "
                                 f"({', '.join(unexpected[:3])})")
        setattr(owner, last, rebuilt)
