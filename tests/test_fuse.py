"""BatchNorm folding: the folded copy computes what the eval-mode model computes, with no BatchNorm left."""
import pytest
import torch
from torch import nn
from ultralytics.nn.modules import Conv, Conv2

from clmtl.data.shapes import shapes_task
from clmtl.models.fuse import fuse_batchnorm
from clmtl.models.unified import UnifiedModel
from clmtl.stream.scenario import output_spaces
from clmtl.stream.tasks import TASK_KINDS

SIZE = 64


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the (0, 1) defaults, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def randomised_model(task_names, size=SIZE):
    """A model with the shapes tasks in this stream order and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = UnifiedModel(output_spaces([shapes_task(TASK_KINDS[name], name) for name in task_names]), image_size=size)
    randomise_batchnorm(model)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return randomised_model(("seg", "det", "cls"))


def flat(output):
    return torch.cat([t.flatten() for t in output]) if isinstance(output, list) else output.flatten()


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_model_equals_the_eval_model_on_every_task(model, channels_last):
    fused = fuse_batchnorm(model, channels_last=channels_last)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model.forward_all(x), fused.forward_all(x)
        assert expected.keys() == got.keys() == {0, 1, 2}
        features = fused.neck(fused.backbone(x))[0]  # the convs run in the layout asked for
        assert features.is_contiguous(memory_format=torch.channels_last) == channels_last
        for label in expected:
            assert (flat(got[label]) - flat(expected[label])).abs().max() < 1e-4
            single = fused(x, label)
            assert (flat(single) - flat(model(x, label))).abs().max() < 1e-4
        # folding changed the convs: the raw weights differ even though the outputs agree
        assert not torch.equal(fused.head.shared[0].weight, model.head.shared[0].weight)


def test_folded_copy_has_no_batchnorm_takes_no_gradient_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    convs = sum(isinstance(m, Conv) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == convs + 1  # each ultralytics Conv + the head
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_ultralytics_conv2_branch_is_merged_before_folding():
    torch.manual_seed(0)
    block = nn.Sequential(Conv2(3, 8), Conv(8, 4, k=3))
    randomise_batchnorm(block, seed=2)
    block.eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fuse_batchnorm(block)(x), block(x), atol=1e-5, rtol=1e-5)


def test_a_batchnorm_that_follows_no_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"cannot fold BatchNorm layers \['2'\]"):
        fuse_batchnorm(model)
