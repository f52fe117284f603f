"""MultiTaskTemplate's own settings: gradient-norm clipping, no loss computed during evaluation, and a plugin's
loss in place of the criterion's."""
import pytest
import torch
import torch.nn.functional as F
from avalanche.training.plugins import SupervisedPlugin

from clmtl.data.shapes import make_shapes_dataset, shapes_task
from clmtl.models.unified import UnifiedModel
from clmtl.stream.experiences import build_stream
from clmtl.stream.scenario import output_spaces
from clmtl.training.losses import MultiTaskLoss
from clmtl.training.plugin import Plugin
from clmtl.training.template import MultiTaskTemplate

SIZE = 64


class GradientRecorder(SupervisedPlugin):
    """The total gradient norm just before each optimizer step (after the template's backward, clipping included)."""

    def __init__(self):
        super().__init__()
        self.norms = []

    def before_update(self, strategy, **kwargs):
        grads = [p.grad for p in strategy.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def template_for(clip: float, recorder: GradientRecorder):
    task = shapes_task("classification", "cls")
    data = make_shapes_dataset("classification", "train", 8, SIZE, 0)
    stream = build_stream([task], [data], [data])
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces([task]), image_size=SIZE)
    template = MultiTaskTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                 criterion=MultiTaskLoss(model.anchor_layout), train_mb_size=4, train_epochs=1,
                                 device="cpu", evaluator=None, plugins=[recorder], clip_grad_norm=clip)
    return template, stream


def test_gradients_are_rescaled_to_at_most_the_clip_norm_and_untouched_below_it():
    free, clipped = GradientRecorder(), GradientRecorder()
    for recorder, clip in ((free, 0.0), (clipped, 0.05)):
        template, stream = template_for(clip, recorder)
        template.train(stream.train_stream[0])
    assert free.norms[0] > 0.05  # the first step (same weights, same batch) needs clipping
    assert clipped.norms[0] == pytest.approx(0.05, rel=1e-4)
    assert all(norm <= 0.05 * (1 + 1e-4) for norm in clipped.norms)

    loose = GradientRecorder()
    template, stream = template_for(1e6, loose)  # far above every norm: the same steps as without clipping
    template.train(stream.train_stream[0])
    assert loose.norms == pytest.approx(free.norms, rel=1e-6)


def test_evaluation_computes_no_loss():
    """A task not trained yet may hold labels its head cannot predict (class scenario): no loss may be attempted."""
    template, stream = template_for(0.0, GradientRecorder())
    template.is_training = False
    template.mb_output, template.mbatch = torch.zeros(2, 5), [torch.zeros(2, 3, SIZE, SIZE), torch.tensor([7, 9]),
                                                               torch.zeros(2, dtype=torch.long)]
    assert float(template.criterion()) == 0.0
    template.is_training = True
    with pytest.raises(IndexError):  # label 7 of 5 logits: the training loss does fail, evaluation must not try
        template.criterion()


class Replacer(Plugin):
    """Acts on the criterion: the mini-batch's loss is the sum of its logits."""

    def batch_loss(self, strategy):
        return strategy.mb_output.sum()


def test_a_plugin_that_acts_on_the_criterion_replaces_the_mini_batchs_loss_and_plain_ones_keep_it():
    template, _ = template_for(0.0, GradientRecorder())
    template.is_training = True
    logits = torch.randn(2, 5)
    template.mb_output, template.mbatch = logits, [torch.zeros(2, 3, SIZE, SIZE), torch.tensor([1, 3]),
                                                   torch.zeros(2, dtype=torch.long)]
    assert float(template.criterion()) == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 3]))))
    template.plugins.insert(0, Replacer())
    assert float(template.criterion()) == pytest.approx(float(logits.sum()))
