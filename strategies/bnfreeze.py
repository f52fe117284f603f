"""BatchNorm freeze: keep the normalisation every task was trained with.

Drift of BatchNorm running statistics in the shared backbone is a main cause of forgetting that EWC does not
touch (it regularises parameters, not buffers): on shapes, detection-time statistics alone take segmentation
from 0.60 to 0.30 mIoU. After the first experience this plugin freezes every BatchNorm layer — running
statistics (the layer stays in eval mode while training) and affine parameters.
"""
from __future__ import annotations

from avalanche.training.plugins import SupervisedPlugin
from torch import nn

from clmtl.registry import register


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BatchNormFreeze(SupervisedPlugin):
    """Freezes BatchNorm statistics and affine parameters from the second experience on."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    def after_training_exp(self, strategy, **kwargs) -> None:
        if not self.frozen:
            for layer in batch_norms(strategy.model):
                for param in layer.parameters():
                    param.requires_grad_(False)
            self.frozen = True

    def before_training_iteration(self, strategy, **kwargs) -> None:
        # The template (and EWC's Fisher pass) put the model back in train mode; undo it for BN alone.
        if self.frozen:
            for layer in batch_norms(strategy.model):
                layer.eval()


@register("bnfreeze", acts_on=("model",))
def bnfreeze(params: dict) -> BatchNormFreeze:
    """Freeze BatchNorm statistics and affine parameters after the first experience."""
    return BatchNormFreeze()
