"""Memory Aware Synapses (Aljundi et al. 2018) as a clmtl strategy, in one file. Run it (or mas+replay, ...) with
clmtl run --plugin-file examples/custom_strategy.py --strategy mas"""
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from clmtl.settings import AT_LEAST_ONE, NON_NEGATIVE, setting
from clmtl.strategies.ewc import ewc_penalty, merge_anchors  # sum over anchors of importance * (theta - theta*)^2
from clmtl.training.plugin import Plugin, to_device
from clmtl.training.registry import register


@dataclass(frozen=True)
class MASSettings:
    lambda_: float = setting(1.0, NON_NEGATIVE, help="weight of the penalty")  # config key: lambda (a Python keyword)
    batch_size: int = setting(16, AT_LEAST_ONE, help="batch size of the importance pass")


@register("mas", settings=MASSettings, acts_on=("loss",))
class MemoryAwareSynapses(Plugin):
    """Memory Aware Synapses: penalty weighted by each parameter's effect on the output norm (no labels needed)."""

    state = ("anchors", "merged")  # carried across experiences: checkpoints, --resume and torchrun keep them

    def __init__(self, lambda_: float, batch_size: int) -> None:  # built with MASSettings' fields, by their names
        super().__init__()
        self.lambda_, self.batch_size = lambda_, batch_size
        self.anchors: list[tuple[dict, dict]] = []  # (theta*, importance) of every finished experience
        self.merged = None  # all of them as one quadratic, computed once per experience

    def before_backward(self, strategy, **kwargs) -> None:
        if self.anchors:
            strategy.loss += self.lambda_ * ewc_penalty(strategy.model, self.merged)

    def after_training_exp(self, strategy, **kwargs) -> None:
        model, data = strategy.model, strategy.experience.dataset
        model.eval()
        importance = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        loader = DataLoader(data, batch_size=self.batch_size, collate_fn=data.collate_fn)
        for images, _, task_labels in loader:
            model.zero_grad()
            output = model(to_device(images, strategy.device), int(task_labels[0]))
            levels = output if isinstance(output, (list, tuple)) else [output]  # detection: its pyramid levels
            (sum(level.pow(2).sum() for level in levels) / len(images)).backward()  # squared norm per image
            for name, p in model.named_parameters():
                if p.grad is not None:
                    importance[name] += p.grad.abs() / len(loader)
        self.anchors.append(({name: p.detach().clone() for name, p in model.named_parameters()}, importance))
        self.merged = merge_anchors(self.anchors)
        model.train()
