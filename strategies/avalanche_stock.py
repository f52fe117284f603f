"""Avalanche's own plugins by name, on streams of classification tasks: ``avalanche.SynapticIntelligence``,
``avalanche.MAS``, ``avalanche.GEM``, ``avalanche.AGEM``, ``avalanche.RWalk``, ``avalanche.GDumb``.

Each takes the constructor parameters of its Avalanche plugin (``avalanche.training.plugins``), by the same names and
with the same defaults; where Avalanche has none, the value its own examples and baselines use (SI's λ 1, GEM's and
A-GEM's 256 patterns per experience, GEM's memory strength 0.5, A-GEM's 256 reference samples). They compose with
clmtl's strategies (``ewc+avalanche.SynapticIntelligence``, ``avalanche.AGEM+lwf``).

They assume what Avalanche's classification benchmarks give: one logits tensor ``[B, C]`` per mini-batch
(``strategy.mb_output``), class-label targets (``strategy.mb_y``) and, for GDumb, the dataset's ``targets``. clmtl's
classification batches are exactly that (its stream adds ``targets``, ``clmtl.stream.experiences``); segmentation label
maps and detection box lists are not, so every one of them declares ``kinds=("classification",)`` and a stream with
another kind is refused before training (``clmtl.training.registry.check_stream``).

Each subclasses Avalanche's plugin and ``clmtl.training.plugin.Plugin``, and declares the state it holds (below). SI is
Avalanche's plugin as it is otherwise. Each of the others changes only what clmtl's model and template need, and says
why:

- MAS's importance pass runs in train mode after training, which moved the BatchNorm statistics of the model about to
  be evaluated: they (and every module's mode) are put back afterwards.
- GEM and A-GEM set the whole model to train mode before their memory pass, which undid plugins that keep parts in
  eval mode (``bnfreeze``); the template has the model in training mode already. A-GEM's memory sample mixes the
  tasks it keeps, which one forward pass of clmtl's model cannot (each task has its own head): each task's share goes
  through its head and the losses are weighted by their shares, which is the mean loss over the sample. Both wrote
  the projected gradient only into the gradients the mini-batch made, dropping its part on the earlier tasks' heads
  in the task scenario (so the step could still raise the memory's loss); it is written into every parameter it
  moves, as the papers' projection of the whole parameter vector has it. A-GEM's ``p.grad.view(-1)`` also failed on
  channels_last convolutions.
- RWalk's gradient pass switched the model to eval mode and left it there for the training step; it puts each
  module's mode back. Its scores are divided by their maximum, 0 (hence NaN penalties) when no ``delta_t`` window
  closed in the experience; they then count as 0.
- GDumb retrains from the initial weights at every experience by swapping in a copy of the model, so the run kept
  checkpointing and reporting the old one; the initial weights are loaded into the same model instead. Its memory
  is trained in mixed mini-batches, so it needs every task in one head (scenario class or domain).

SI, MAS, RWalk and GEM declare what they hold (Avalanche's ``ParamData`` by parameter, GEM's stored patterns), so run
checkpoints keep it and a resumed run ends as the uninterrupted one. A-GEM and GDumb keep their memory as Avalanche
datasets (views on the training sets, with A-GEM's endless loader over them), which a checkpoint of tensors cannot
hold: a run with either is refused at ``--resume``, in one line that says so (``no_resume``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from avalanche.models.utils import avalanche_forward
from avalanche.training.plugins import (AGEMPlugin, GDumbPlugin, GEMPlugin, MASPlugin, RWalkPlugin,
                                        SynapticIntelligencePlugin)
from torch import nn

from clmtl.errors import ConfigError
from clmtl.settings import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, PER_EXPERIENCE, POSITIVE, setting
from clmtl.stream.scenario import placed
from clmtl.stream.tasks import CLASSIFICATION, TaskSpec
from clmtl.training.plugin import Plugin, evaluating
from clmtl.training.registry import register

KINDS = (CLASSIFICATION,)


def flat_gradient(model: nn.Module, device: torch.device | str) -> torch.Tensor:
    """Every parameter's gradient as one vector, zeros where a parameter has none (Avalanche's GEM layout)."""
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=device)
                      for p in model.parameters()])


def set_gradient(model: nn.Module, vector: torch.Tensor) -> None:
    """``vector`` (``flat_gradient``'s layout) as the parameters' gradients, also where the mini-batch left a parameter
    without one and ``vector`` moves it: a projection moves the heads of the earlier tasks whose memory it protects.

    Avalanche's GEM and A-GEM write only the gradients that exist, which on a model with a head per task drops that
    part of the projection: the update then still raises the memory's loss to first order."""
    start = 0
    for param in model.parameters():
        piece = vector[start:start + param.numel()].view(param.shape)
        if param.grad is not None:
            param.grad.copy_(piece)
        elif param.requires_grad and piece.any():
            param.grad = torch.empty_like(param).copy_(piece)  # the parameter's memory format (channels_last)
        start += param.numel()


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Every buffer (BatchNorm statistics) and module mode as they were before the block."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in buffers and buffers[name].shape == buffer.shape:
                    buffer.copy_(buffers[name])
        for module, training in modes:
            module.training = training


# ----------------------------------------------------------------------------------------------- the plugins

class SI(SynapticIntelligencePlugin, Plugin):
    """Avalanche's Synaptic Intelligence: penalty weighted by each parameter's path integral of the loss change.

    Avalanche's plugin as it is, with its state declared."""

    state = ("ewc_data", "syn_data")
    """The weights at the last minimum and their importances; the path integral's terms of the experience."""


class MAS(MASPlugin, Plugin):
    """Avalanche's Memory Aware Synapses: penalty weighted by each parameter's effect on the output norm.

    Its importance pass leaves BatchNorm statistics and module modes as training left them."""

    state = ("params", "importance")

    def _get_importance(self, strategy):
        with kept_buffers(strategy.model):
            return super()._get_importance(strategy)


class GEM(GEMPlugin, Plugin):
    """Avalanche's GEM: the gradient projected (quadratic program) so no kept experience's memory loss grows.

    Its memory pass runs in the mode the model trains in (Avalanche forces train mode on every module), and the
    projected gradient is applied to every parameter it moves (``set_gradient``)."""

    state = ("memory_x", "memory_y", "memory_tid")
    """The patterns kept of each experience."""
    transient = ("G",)
    """The memories' gradients, computed again at every iteration."""

    def before_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_counter == 0:
            return
        rows = []
        for t in range(strategy.clock.train_exp_counter):
            strategy.optimizer.zero_grad()
            out = avalanche_forward(strategy.model, self.memory_x[t].to(strategy.device), self.memory_tid[t])
            strategy._criterion(out, self.memory_y[t].to(strategy.device)).backward()
            rows.append(flat_gradient(strategy.model, strategy.device))
        self.G = torch.stack(rows)  # (experiences, parameters)

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        if strategy.clock.train_exp_counter == 0:
            return
        current = flat_gradient(strategy.model, strategy.device)
        if (torch.mv(self.G, current) < 0).any():
            set_gradient(strategy.model, self.solve_quadprog(current).to(strategy.device))


class AGEM(AGEMPlugin, Plugin):
    """Avalanche's A-GEM: the gradient projected so the loss on a memory sample does not grow.

    The memory sample's tasks each go through their own head (its loss: the sample's mean), and the projected gradient
    is applied to every parameter it moves (``set_gradient``)."""

    no_resume = ("A-GEM keeps its memory as Avalanche datasets with an endless loader over them, which a checkpoint "
                 "of tensors cannot hold; rerun it from the start")

    def before_training_iteration(self, strategy, **kwargs) -> None:
        if not self.buffers:
            return
        strategy.optimizer.zero_grad()
        batch = self.sample_from_memory()
        x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
        labels = torch.as_tensor(batch[-1])
        loss = torch.zeros((), device=strategy.device)
        for task in labels.unique().tolist():
            share = (labels == task).to(strategy.device)
            out = avalanche_forward(strategy.model, x[share], int(task))
            loss = loss + strategy._criterion(out, y[share]) * (share.sum() / len(labels))
        loss.backward()
        self.reference_gradients = flat_gradient(strategy.model, strategy.device)
        strategy.optimizer.zero_grad()

    @torch.no_grad()
    def after_backward(self, strategy, **kwargs) -> None:
        if not self.buffers:
            return
        current = flat_gradient(strategy.model, strategy.device)
        dot = current.dot(self.reference_gradients)
        if dot < 0:
            reference = self.reference_gradients
            set_gradient(strategy.model, current - reference * (dot / reference.dot(reference)))


class RWalk(RWalkPlugin, Plugin):
    """Avalanche's RWalk: penalty weighted by online Fisher (EWC++) plus each parameter's score of loss change.

    The model's modes are restored after its gradient pass; no score window closed: scores 0."""

    state = ("checkpoint_params", "checkpoint_loss", "checkpoint_scores", "iter_grad", "iter_importance",
             "iter_params", "exp_scores", "exp_params", "exp_importance", "exp_penalties")
    """Every ``ParamData`` store: of the last score window, the last iteration and the finished experiences."""

    def _update_grad(self, strategy) -> None:
        with evaluating(strategy.model):  # Avalanche sets eval mode and leaves it for the training step
            super()._update_grad(strategy)

    def after_training_exp(self, strategy, **kwargs) -> None:
        super().after_training_exp(strategy, **kwargs)
        max_score = max(float(score.data.max()) for score in self.exp_scores.values())
        if max_score > 0:
            return
        max_importance = max(float(importance.data.max()) for importance in self.exp_importance.values())
        for name, penalty in self.exp_penalties.items():  # relu(score) / max_score was 0 / 0
            penalty.data = self.exp_importance[name].data / max_importance


class GDumb(GDumbPlugin, Plugin):
    """Avalanche's GDumb: each experience retrains from the initial weights on a class-balanced memory only.

    The initial weights are loaded into the run's model instead of a copy swapped in."""

    no_resume = ("GDumb keeps its memory as Avalanche datasets, which a checkpoint of tensors cannot hold; rerun it "
                 "from the start")

    def __init__(self, mem_size: int = 200) -> None:
        super().__init__(mem_size)
        self.init_state: dict[str, torch.Tensor] | None = None

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        if self.init_state is None:
            self.init_state = {name: value.detach().clone() for name, value in strategy.model.state_dict().items()}
        else:  # heads shrink to their first size; the template's model adaptation grows them again
            strategy.model.load_state_dict(self.init_state)

    def before_eval_dataset_adaptation(self, strategy, **kwargs) -> None:
        """Nothing: Avalanche's adapts the copy it keeps, and the model is adapted by the template."""


def require_one_head(strategy: str, tasks: Sequence[TaskSpec]) -> None:
    """Refuse a strategy that trains on mini-batches mixing the samples of several tasks on a stream whose tasks have
    heads of their own: one forward pass runs one head."""
    tasks = placed(tasks)
    others = [task for task in tasks if task.head != tasks[0].head]
    if others:
        raise ConfigError(f"strategy {strategy} trains on mini-batches that mix every task's samples, which one head "
                          f"must take; tasks {tasks[0].name!r} and {others[0].name!r} have heads {tasks[0].head} and "
                          f"{others[0].head} (scenario task): use scenario class or domain")


# ---------------------------------------------------------------------------------------------- the settings

@dataclass(frozen=True)
class SynapticIntelligenceSettings:
    """``SynapticIntelligencePlugin``'s parameters, ``strategy.avalanche.SynapticIntelligence.<key>``."""

    si_lambda: float | list[float] = setting(1.0, PER_EXPERIENCE, help="weight of the penalty; a list: one per "
                                             "experience, the last for the rest (Avalanche: no default)")
    eps: float = setting(1e-7, POSITIVE, help="damping added to each parameter's squared move")
    excluded_parameters: list[str] | None = setting(None, help="parameter name patterns left out (BatchNorm always is)")
    device: str = setting("as_strategy", help="where the penalty is computed (as_strategy: the run's device)")


@dataclass(frozen=True)
class MASSettings:
    """``MASPlugin``'s parameters, ``strategy.avalanche.MAS.<key>``."""

    lambda_reg: float = setting(1.0, NON_NEGATIVE, help="weight of the penalty")
    alpha: float = setting(0.5, FRACTION, help="weight of the earlier importance when a new one is merged in")
    verbose: bool = setting(False, help="show a progress bar for the importance pass")


@dataclass(frozen=True)
class GEMSettings:
    """``GEMPlugin``'s parameters, ``strategy.avalanche.GEM.<key>``."""

    patterns_per_experience: int = setting(256, AT_LEAST_ONE, help="samples kept per experience (Avalanche: no "
                                                                   "default)")
    memory_strength: float = setting(0.5, NON_NEGATIVE, help="γ, margin added to the projection's constraints "
                                                              "(Avalanche: no default)")


@dataclass(frozen=True)
class AGEMSettings:
    """``AGEMPlugin``'s parameters, ``strategy.avalanche.AGEM.<key>``."""

    patterns_per_experience: int = setting(256, AT_LEAST_ONE, help="samples kept per experience (Avalanche: no "
                                                                   "default)")
    sample_size: int = setting(256, AT_LEAST_ONE, help="memory samples of each reference gradient, split over the "
                                                       "experiences kept (Avalanche: no default)")


@dataclass(frozen=True)
class RWalkSettings:
    """``RWalkPlugin``'s parameters, ``strategy.avalanche.RWalk.<key>``."""

    ewc_lambda: float = setting(0.1, NON_NEGATIVE, help="weight of the penalty")
    ewc_alpha: float = setting(0.9, FRACTION, help="moving-average weight of the newest Fisher estimate (EWC++)")
    delta_t: int = setting(10, AT_LEAST_ONE, help="iterations between updates of the parameter scores")


@dataclass(frozen=True)
class GDumbSettings:
    """``GDumbPlugin``'s parameters, ``strategy.avalanche.GDumb.<key>``."""

    mem_size: int = setting(200, AT_LEAST_ONE, help="samples kept, balanced over the classes seen")


# ------------------------------------------------------------------------------------------- the registrations
# Each plugin is built with its settings as keyword arguments: the fields are named as Avalanche's parameters.

register("avalanche.SynapticIntelligence", settings=SynapticIntelligenceSettings, acts_on=("loss",), kinds=KINDS)(SI)
register("avalanche.MAS", settings=MASSettings, acts_on=("loss",), kinds=KINDS)(MAS)
register("avalanche.GEM", settings=GEMSettings, acts_on=("gradient",), kinds=KINDS)(GEM)
register("avalanche.AGEM", settings=AGEMSettings, acts_on=("gradient",), kinds=KINDS)(AGEM)
register("avalanche.RWalk", settings=RWalkSettings, acts_on=("loss",), kinds=KINDS)(RWalk)
register("avalanche.GDumb", settings=GDumbSettings, acts_on=("model", "data"), kinds=KINDS,
         check=require_one_head)(GDumb)
