"""Memory Aware Synapses (Aljundi et al. 2018) as a clmtl strategy, in one file. Run it (or mas+replay, ...) with
clmtl run --plugin-file examples/custom_strategy.py --strategy mas"""
import torch
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import DataLoader

from clmtl.registry import register
from clmtl.plugin import to_device
from strategies.ewc import ewc_penalty, merge_anchors  # sum over anchors of importance * (theta - theta*)^2


def squared_norm(output) -> torch.Tensor:
    """Squared L2 norm of any task's output per image (detection: summed over its pyramid levels)."""
    levels = output if isinstance(output, (list, tuple)) else [output]
    return sum(level.pow(2).sum() for level in levels) / len(levels[0])


class MemoryAwareSynapses(SupervisedPlugin):
    """Importance = mean |d ||f(x)||^2 / d theta| on the task's data: no labels needed, any output kind."""

    def __init__(self, strength: float, batch_size: int) -> None:
        super().__init__()
        self.strength, self.batch_size = strength, batch_size
        self.anchors: list[tuple[dict, dict]] = []  # (theta*, importance) of every finished experience

    def before_backward(self, strategy, **kwargs) -> None:
        if self.anchors:  # merged: all of them as one quadratic, computed once per experience
            strategy.loss += self.strength * ewc_penalty(strategy.model, self.merged)

    def after_training_exp(self, strategy, **kwargs) -> None:
        model, data = strategy.model, strategy.experience.dataset
        model.eval()
        importance = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        loader = DataLoader(data, batch_size=self.batch_size, collate_fn=data.collate_fn)
        for images, _, task_labels in loader:
            model.zero_grad()
            squared_norm(model(to_device(images, strategy.device), int(task_labels[0]))).backward()
            for name, p in model.named_parameters():
                if p.grad is not None:
                    importance[name] += p.grad.abs() / len(loader)
        self.anchors.append(({name: p.detach().clone() for name, p in model.named_parameters()}, importance))
        self.merged = merge_anchors(self.anchors)
        model.train()


@register("mas", defaults={"lambda": 1.0, "batch_size": 16}, acts_on=("loss",))
def mas(params: dict) -> MemoryAwareSynapses:
    """Memory Aware Synapses: penalty weighted by each parameter's effect on the output norm."""
    return MemoryAwareSynapses(params["lambda"], params["batch_size"])
