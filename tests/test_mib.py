"""MiB: its two losses on a hand-computed 2x2 image with 3 classes and against the authors' formulas, the
background initialisation, and the streams it refuses in one line."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import clmtl
from clmtl.errors import ConfigError
from clmtl.models.unified import UnifiedModel
from clmtl.stream.tasks import OutputSpace
from clmtl.strategies.mib import MiBPlugin, initialise_from_background, unbiased_cross_entropy, unbiased_distillation

LN2, LN3 = math.log(2), math.log(3)


def two_by_two(pixels):
    """``[1, C, 2, 2]`` from four per-pixel vectors in row order."""
    return torch.tensor(pixels, dtype=torch.float64).T.reshape(1, -1, 2, 2)


# background 0, old class 1, new class 2; pixels A, B / C, D
LOGITS = two_by_two([[0, 0, 0], [LN2, 0, 0], [0, LN3, 0], [0, 0, 0]])
LABELS = torch.tensor([[[0, 2], [0, 255]]])
OLD_LOGITS = two_by_two([[0, 0], [LN3, 0], [0, LN3], [0, 0]])


def test_the_unbiased_cross_entropy_by_hand():
    # A: softmax (1/3, 1/3, 1/3), background or old: 2/3. B: (2, 1, 1)/4, class 2: 1/4. C: (1, 3, 1)/5, background or
    # old: 4/5. D is ignored.
    expected = -(math.log(2 / 3) + math.log(1 / 4) + math.log(4 / 5)) / 3
    assert float(unbiased_cross_entropy(LOGITS, LABELS, old=2)) == pytest.approx(expected, rel=1e-12)
    plain = -(math.log(1 / 3) + math.log(1 / 4) + math.log(1 / 5)) / 3  # with no old class it is the cross-entropy
    assert float(unbiased_cross_entropy(LOGITS, LABELS, old=1)) == pytest.approx(plain, rel=1e-12)
    assert float(F.cross_entropy(LOGITS, LABELS, ignore_index=255)) == pytest.approx(plain, rel=1e-12)


def test_the_unbiased_distillation_by_hand():
    # per pixel: p_old(bg) log q(bg or new) + p_old(1) log q(1), over old = 2 classes; every pixel counts
    a = (0.5 * math.log(2 / 3) + 0.5 * math.log(1 / 3)) / 2
    b = (0.75 * math.log(3 / 4) + 0.25 * math.log(1 / 4)) / 2
    c = (0.25 * math.log(2 / 5) + 0.75 * math.log(3 / 5)) / 2
    expected = -(a + b + c + a) / 4
    assert float(unbiased_distillation(LOGITS, OLD_LOGITS)) == pytest.approx(expected, rel=1e-12)


def authors_losses(inputs, targets, old_logits, old_cl):
    """MiB's ``UnbiasedCrossEntropy`` and ``UnbiasedKnowledgeDistillationLoss`` (alpha 1, mean), as its code is."""
    outputs = torch.zeros_like(inputs)
    den = torch.logsumexp(inputs, dim=1)
    outputs[:, 0] = torch.logsumexp(inputs[:, 0:old_cl], dim=1) - den
    outputs[:, old_cl:] = inputs[:, old_cl:] - den.unsqueeze(dim=1)
    labels = targets.clone()
    labels[targets < old_cl] = 0
    unce = F.nll_loss(outputs, labels, ignore_index=255)
    new_cl = inputs.shape[1] - old_logits.shape[1]
    new_bkg_idx = torch.tensor([0] + list(range(old_cl, inputs.shape[1])))
    outputs_no_bgk = inputs[:, 1:-new_cl] - den.unsqueeze(dim=1)
    outputs_bkg = torch.logsumexp(torch.index_select(inputs, 1, new_bkg_idx), dim=1) - den
    soft = torch.softmax(old_logits, dim=1)
    unkd = -((soft[:, 0] * outputs_bkg + (soft[:, 1:] * outputs_no_bgk).sum(dim=1)) / old_logits.shape[1]).mean()
    return unce, unkd


def test_both_losses_equal_the_authors_on_the_new_tasks_labels():
    generator = torch.Generator().manual_seed(0)
    logits, old_logits = torch.randn(2, 6, 5, 5, generator=generator), torch.randn(2, 4, 5, 5, generator=generator)
    labels = torch.randint(4, 6, (2, 5, 5), generator=generator)  # the new classes 4, 5...
    labels[:, :2] = 0  # ...background...
    labels[:, -1, -1] = 255  # ...and void
    unce, unkd = authors_losses(logits, labels, old_logits, old_cl=4)
    assert float(unbiased_cross_entropy(logits, labels, 4)) == pytest.approx(float(unce), rel=1e-6)
    assert float(unbiased_distillation(logits, old_logits)) == pytest.approx(float(unkd), rel=1e-6)


def test_new_rows_start_as_the_background_row_splitting_its_probability():
    weight, bias = torch.randn(5, 3), torch.tensor([2.0, 0.1, 0.2, 7.0, 8.0])
    kept = weight[:3].clone()
    initialise_from_background(weight, bias, old=3)
    assert torch.equal(weight[:3], kept) and torch.equal(weight[3], kept[0]) and torch.equal(weight[4], kept[0])
    shared = 2.0 - math.log(3)
    assert bias.tolist() == pytest.approx([shared, 0.1, 0.2, shared, shared])
    x = torch.randn(3)  # background and the two new classes share what background alone had
    old_probs = F.softmax(torch.cat([kept @ x + torch.tensor([2.0, 0.1, 0.2])]), 0)
    new_probs = F.softmax(weight @ x + bias, 0)
    assert float(new_probs[[0, 3, 4]].sum()) == pytest.approx(float(old_probs[0]), rel=1e-5)
    assert float(new_probs[3]) == pytest.approx(float(old_probs[0]) / 3, rel=1e-5)


STREAM = {"scenario": "class", "seed": 0, "output": {"overlays": 0},
          "data": {"image_size": 64, "train_size": 8, "val_size": 4},
          "train": {"epochs": 1, "batch_size": 4, "threads": 1},
          "tasks": [{"name": "a", "kind": "seg", "data": {"classes": ["disk", "square"]}},
                    {"name": "b", "kind": "seg", "data": {"classes": ["ring"]}}]}


def grown_then_initialised(plugin: MiBPlugin):
    """A head that knew background, disk and square grows ring; returns its rows as grown (before the plugin's
    ``before_training_exp``) and the rows after it."""
    torch.manual_seed(0)
    space = OutputSpace("segmentation", ("background", "disk", "square", "ring"), None, 3)
    model = UnifiedModel([space], image_size=64)
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(task_label=0))
    plugin.before_training_exp(strategy)  # the first experience: nothing to initialise
    plugin.after_training_exp(strategy)  # the teacher knows background, disk, square
    model.grow(0, 4)  # the next experience brings ring
    rows = model.rows(0)
    grown = rows.weight.detach().clone(), rows.bias.detach().clone()
    plugin.before_training_exp(strategy)
    return grown, (rows.weight.detach(), rows.bias.detach())


def test_a_grown_head_starts_its_new_class_from_the_background_row():
    grown, (weight, bias) = grown_then_initialised(MiBPlugin())
    assert torch.equal(weight[3], weight[0]) and torch.equal(weight[:3], grown[0][:3])
    assert float(bias[3]) == float(bias[0]) == pytest.approx(float(grown[1][0]) - math.log(2))


def test_without_the_background_initialisation_grown_rows_stay_as_drawn():
    grown, (weight, bias) = grown_then_initialised(MiBPlugin(init_from_background=False))
    assert torch.equal(weight, grown[0]) and torch.equal(bias, grown[1])


@pytest.mark.parametrize("config,message", [
    ({**STREAM, "scenario": "task"}, "mib acts in the class scenario"),
    ({**STREAM, "tasks": ["seg", "cls"]}, "strategy mib handles segmentation tasks only"),
])
def test_streams_it_cannot_act_on_are_refused_in_one_line(tmp_path, config, message):
    with pytest.raises(ConfigError) as refused:
        clmtl.run(config, "mib", tmp_path / "run", baselines=False)
    assert message in str(refused.value) and "\n" not in str(refused.value)
