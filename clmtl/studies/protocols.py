"""Published continual-learning experiments as data, turned into clmtl runs, and a verdict for every reproduced cell.

A protocol file (``benchmarks/protocols/<name>.yaml``) holds one paper's experiment as the paper states it: the stream
(``split`` or ``permuted`` MNIST), the network, optimizer, batch size and iterations per task, and for every method
its hyperparameters per scenario and the published mean and spread of each cell, with the source and whether each
number was checked against the paper. This module reads such a file, builds the clmtl config of every (scenario,
method) and judges each cell: **reproduced** when the published mean lies inside our 95 % confidence interval widened
on each side by the published standard error, otherwise **not reproduced**, with the gap.

The papers write their penalties in other conventions than clmtl's strategies; ``strategy_for`` translates (each
rule says which paper convention it follows).
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from clmtl.config import load_config
from clmtl.errors import ConfigError
from clmtl.io import atomic_write_json
from clmtl.runner import run
from clmtl.stream.scenario import SCENARIOS
from clmtl.studies.avalanche_reference import train_avalanche
from clmtl.studies.significance import t_half_width
from clmtl.training.registry import strategy_schemas

METHODS = ("naive", "joint", "ewc", "online_ewc", "si", "lwf", "replay")
"""The methods a protocol file may list, by clmtl's names."""
STREAMS = ("split", "permuted")
PROTOCOL_KEYS = ("name", "title", "source", "runs", "protocol", "scenarios", "methods")
MNIST_CLASSES = 10


@dataclass(frozen=True)
class Published:
    """A published cell: mean and standard error of the mean, as fractions (None: not reported)."""

    mean: float
    sem: float | None


@dataclass(frozen=True)
class Method:
    name: str
    paper_name: str
    hyperparameters: dict[str, dict[str, Any]]
    """Per scenario, in the paper's terms (``lambda``, ``c``, ``gamma``, ``temperature``, ``budget_per_class``)."""
    published: dict[str, Published | None]
    checked: bool


@dataclass(frozen=True)
class Protocol:
    """One published experiment (a protocol file)."""

    name: str
    title: str
    source: dict[str, str]
    runs: int
    stream: str
    tasks: int
    hidden: list[int]
    image_size: int
    channels: int
    optimizer: str
    lr: float
    batch_size: int
    iterations: int
    scenarios: list[str]
    methods: dict[str, Method]

    @classmethod
    def load(cls, path: str | Path) -> Protocol:
        """Read and check a protocol file; a problem is one ``ConfigError`` line naming the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such protocol file") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from None
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            problem = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise ConfigError(f"{path}: {problem}") from None

    @classmethod
    def _from_dict(cls, data: Any) -> Protocol:
        if not isinstance(data, Mapping):
            raise ValueError("a protocol file is a mapping of " + ", ".join(PROTOCOL_KEYS))
        described = data["protocol"]
        stream = described["stream"]
        if stream not in STREAMS:
            raise ValueError(f"protocol.stream must be one of {', '.join(STREAMS)}, got {stream!r}")
        scenarios = list(data["scenarios"])
        unknown = [s for s in scenarios if s not in SCENARIOS]
        if unknown:
            raise ValueError(f"scenarios: {unknown} are not among {', '.join(SCENARIOS)}")
        methods = {}
        for name, entry in data["methods"].items():
            if name not in METHODS:
                raise ValueError(f"methods: {name!r} is not one of {', '.join(METHODS)}")
            published = {scenario: _published(entry["published"], scenario) for scenario in scenarios}
            hyperparameters = {s: dict((entry.get("hyperparameters") or {}).get(s) or {}) for s in scenarios}
            methods[name] = Method(name, str(entry.get("paper_name", name)), hyperparameters, published,
                                   bool(entry["checked"]))
        network, optimizer = described["network"], described["optimizer"]
        if network["kind"] != "mlp":
            raise ValueError(f"protocol.network.kind {network['kind']!r}: only mlp protocols are supported")
        return cls(str(data["name"]), str(data["title"]), dict(data["source"]), int(data["runs"]), stream,
                   int(described["tasks"]), [int(h) for h in network["hidden"]], int(described["input"]["size"]),
                   int(described["input"]["channels"]), str(optimizer["name"]), float(optimizer["lr"]),
                   int(described["batch_size"]), int(described["iterations"]), scenarios, methods)

    def config(self, scenario: str, data: Mapping[str, Any], iterations: int | None = None) -> dict[str, Any]:
        """The clmtl config (a dict for ``clmtl.load_config``) of this protocol in ``scenario`` on ``data`` (a task
        data source, ``mnist_source``); ``iterations`` shortens the budget (a quick look, not a reproduction).

        The papers' recipe and nothing else: no augmentation, warmup, weight averaging or clipping, float32, one
        optimizer state for the whole stream (Adam is not reset between tasks), the digits dealt to tasks in an order
        drawn from the seed (the papers' code does so).
        """
        if self.stream == "split":
            stream = {"split": {"kind": "classification", "data": dict(data), "experiences": self.tasks,
                                "class_order": "seed"}}
        else:
            stream = {"domains": {"kind": "classification", "data": dict(data), "permute": self.tasks}}
        return {
            **stream,
            "scenario": scenario,
            "data": {"image_size": self.image_size, "channels": self.channels, "hflip": 0.0},
            "model": {"backbone": "mlp", "hidden": list(self.hidden)},
            "train": {"optimizer": self.optimizer, "lr": self.lr, "batch_size": self.batch_size,
                      "iterations": iterations or self.iterations, "reset_optimizer": False, "warmup": 0, "ema": 0,
                      "schedule": "constant", "weight_decay": 0.0, "clip_grad_norm": 0.0, "precision": "fp32",
                      "channels_last": False, "parallel_baselines": False, "eval_batch_size": 1000},
            "output": {"overlays": 0, "checkpoints": False},
        }

    def strategy_for(self, method: str, scenario: str) -> tuple[str, list[str]]:
        """clmtl's strategy and overrides for ``method`` in ``scenario``, its hyperparameters translated."""
        hyper = self.methods[method].hyperparameters[scenario]
        if method in ("naive", "joint"):
            return method, []
        if method == "ewc":  # the papers' penalty is (lambda / 2) sum F (theta - theta*)^2; clmtl's has no 1/2
            return "ewc", [f"strategy.ewc.lambda={hyper['lambda'] / 2}",
                           f"strategy.ewc.fisher={hyper.get('fisher', 'exact')}"]
        if method == "online_ewc":  # van de Ven's code: (lambda / 2) gamma F~ (theta - theta*)^2, F~ = gamma F~ + F
            gamma = hyper["gamma"]
            return "ewc", ["strategy.ewc.mode=online", f"strategy.ewc.decay={gamma}",
                           f"strategy.ewc.lambda={hyper['lambda'] * gamma / 2}",
                           f"strategy.ewc.fisher={hyper.get('fisher', 'exact')}"]
        if method == "si":  # c sum Omega (theta - theta*)^2 with damping xi, as clmtl's si
            return "si", [f"strategy.si.c={hyper['c']}", f"strategy.si.damping={hyper.get('damping', 0.1)}"]
        if method == "lwf":  # (1/N) L_current + (1 - 1/N) L_distill: under Adam, L_current + (N - 1) L_distill
            weights = list(range(self.tasks))
            return "lwf", [f"strategy.lwf.temperature={hyper.get('temperature', 2.0)}",
                           f"strategy.lwf.alpha={weights}"]
        assert method == "replay"  # a budget per class: the memory grows as the classes arrive
        return "replay", [f"strategy.replay.mem_per_class={int(hyper['budget_per_class'])}",
                          "strategy.replay.selection=class_balanced", "strategy.replay.ratio=1.0"]


    def avalanche_for(self, method: str, scenario: str) -> tuple[str, dict[str, Any]] | None:
        """Avalanche's own strategy for ``method`` in ``scenario`` and its arguments, in Avalanche's conventions
        (None where Avalanche has no such strategy)."""
        hyper = self.methods[method].hyperparameters[scenario]
        if method == "naive":
            return "Naive", {}
        if method == "ewc":  # Avalanche's EWC penalty has no 1/2 either (its Fisher: squared mini-batch gradients)
            return "EWC", {"ewc_lambda": hyper["lambda"] / 2}
        if method == "si":  # Avalanche's: (lambda / 2) sum Omega (theta - theta*)^2, Omega clamped at 0.001
            return "SynapticIntelligence", {"si_lambda": 2 * hyper["c"], "eps": hyper.get("damping", 0.1)}
        if method == "lwf":  # Avalanche: alpha_e * sum over old heads of KL, no T^2; the papers: (e) * mean of T^2 KL
            temperature = hyper.get("temperature", 2.0)
            per_head = scenario == "task"  # one old head per earlier task; one shared head otherwise
            alpha = [0.0, *(temperature**2 * (1 if per_head else e) for e in range(1, self.tasks))]
            return "LwF", {"alpha": alpha, "temperature": temperature}
        if method == "replay":
            return "Replay", {"mem_size": int(hyper["budget_per_class"]) * MNIST_CLASSES}
        return None


def _published(table: Mapping[str, Any] | None, scenario: str) -> Published | None:
    cell = (table or {}).get(scenario)
    if cell is None or cell.get("mean") is None:
        return None
    sem = cell.get("sem")
    return Published(float(cell["mean"]) / 100, None if sem is None else float(sem) / 100)


def train_clmtl(config: Mapping[str, Any], strategy: str, overrides: list[str], seed: int, out: Path) -> None:
    """One training of a cell (no baselines, one thread), its report written to ``out``: a job of
    ``benchmarks/reproduce.py``, importable by its worker processes."""
    settings = load_config(None, [*overrides, f"seed={seed}"], strategies=strategy_schemas(), base=config,
                           base_source="protocol")
    run(settings, strategy, out, baselines=False, threads=1)


def train_avalanche_cell(config: Mapping[str, Any], name: str, hyperparameters: Mapping[str, Any], seed: int,
                         out: Path) -> None:
    """One training of Avalanche's own strategy ``name`` (``clmtl.studies.avalanche_reference``), its results in
    ``out/results.json``."""
    callers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = train_avalanche(load_config(None, [f"seed={seed}"], base=config, base_source="protocol"), name,
                                  hyperparameters)
    finally:
        torch.set_num_threads(callers)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)


def available_protocols(folder: Path) -> dict[str, Path]:
    """Protocol files by name (the file's stem)."""
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def mnist_source(root: Path | None) -> dict[str, Any]:
    """The task data source of MNIST at ``root``: torchvision's files (``root/MNIST/raw``) or class folders
    (``root/{train,val}/<digit>/``); a root that holds neither is one ``ConfigError`` line."""
    if root is None:
        raise ConfigError("give --root: MNIST is read from a folder, never downloaded")
    if (root / "MNIST" / "raw").is_dir():
        return {"format": "torchvision", "dataset": "MNIST", "root": str(root)}
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {"format": "folder", "root": str(root)}
    raise ConfigError(f"{root}: neither torchvision's MNIST files (MNIST/raw/) nor class folders (train/, val/)")


@dataclass(frozen=True)
class Cell:
    """One reproduced cell: our scores over seeds beside the published number, and the verdict."""

    protocol: str
    scenario: str
    strategy: str
    scores: tuple[float, ...]
    paper: Published | None

    @property
    def seeds(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def interval(self) -> tuple[float, float]:
        """The 95 % t interval of the mean (a single seed: the score itself)."""
        half = t_half_width(self.scores) or 0.0
        return self.mean - half, self.mean + half

    @property
    def verdict(self) -> str:
        return verdict(self.interval, self.mean, self.paper)

    def row(self) -> dict[str, Any]:
        """The cell as a ``table.csv`` row."""
        low, high = self.interval
        return {"protocol": self.protocol, "scenario": self.scenario, "strategy": self.strategy, "seeds": self.seeds,
                "mean": f"{self.mean:.4f}", "low": f"{low:.4f}", "high": f"{high:.4f}",
                "paper": "" if self.paper is None else f"{self.paper.mean:.4f}", "verdict": self.verdict}


CSV_COLUMNS = ("protocol", "scenario", "strategy", "seeds", "mean", "low", "high", "paper", "verdict")


def verdict(interval: tuple[float, float], mean: float, paper: Published | None) -> str:
    """``reproduced`` when the published mean lies in ``interval`` widened by its own standard error on each side
    (a paper without one: by nothing), else ``not reproduced`` with our mean minus the paper's."""
    if paper is None:
        return "no published number"
    margin = paper.sem or 0.0
    low, high = interval
    if low - margin <= paper.mean <= high + margin:
        return "reproduced"
    return f"not reproduced ({mean - paper.mean:+.3f})"
