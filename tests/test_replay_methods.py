"""Replay methods of the classification literature on replay's memory: DER and DER++ (the outputs stored with the
memory, the loss against its definition with a head grown since storing, for classification, segmentation at reduced
resolution and detection; the bytes they report) and ER-ACE (its asymmetric cross-entropy against its definition,
refusing streams it cannot act on)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clmtl
from clmtl.errors import ConfigError
from clmtl.strategies.der import DarkExperienceReplayPlugin, widened
from clmtl.strategies.er_ace import ERACEPlugin, present_class_logits
from clmtl.strategies.replay import MultiTaskReplayPlugin


class TwoHeads(nn.Module):
    """``forward(x, task_label)``: a shared linear body, then the task's own linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3 * 4 * 4, 5)
        self.heads = nn.ModuleList([nn.Linear(5, 3), nn.Linear(5, 2)])

    def forward(self, x, task_label):
        return self.heads[task_label](torch.relu(self.body(x.flatten(1))))


def experience(index: int, head: int, classes: int, size: int = 8):
    generator = torch.Generator().manual_seed(index)
    samples = [[torch.rand(3, 4, 4, generator=generator), i % classes, head] for i in range(size)]
    return SimpleNamespace(dataset=samples, current_experience=index, task_label=head)


def stored_images(plugin, index):
    memory = plugin.buffer.tasks[index]
    return torch.stack([memory[i][0] for i in range(len(memory))])


@pytest.mark.parametrize("beta", [0.0, 0.4])  # der, derpp
def test_the_added_loss_is_the_definition_on_the_logits_stored_at_the_end_of_the_experience(beta):
    torch.manual_seed(0)
    model = TwoHeads()
    plugin = DarkExperienceReplayPlugin(alpha=0.7, beta=beta, mem_size=6, ratio=1.0, seed=3)
    first = experience(0, head=0, classes=3)
    plugin.after_training_exp(SimpleNamespace(model=model, experience=first, device="cpu"))
    with torch.no_grad():
        stored = model(stored_images(plugin, 0), 0)
    assert torch.equal(torch.stack(plugin.logits[0]), stored)  # what the head gave each stored sample

    with torch.no_grad():  # training moved on, and the head grew from 3 classes to 5 (the class scenario)
        grown = nn.Linear(5, 5)
        grown.weight[:3], grown.bias[:3] = model.heads[0].weight, model.heads[0].bias
        model.heads[0] = grown
        model.body.weight.add_(0.1)
    strategy = SimpleNamespace(model=model, experience=experience(1, head=1, classes=2), device="cpu",
                               mb_x=torch.zeros(4, 3, 4, 4), loss=torch.tensor(0.0), _criterion=F.cross_entropy)
    draws = torch.Generator()
    draws.set_state(plugin.generator.get_state())
    plugin.before_backward(strategy)

    images, targets = stored_images(plugin, 0), torch.tensor(plugin.buffer.tasks[0].targets)
    logits = torch.stack(plugin.logits[0])
    first_pick, second_pick = (torch.randperm(6, generator=draws)[:4] for _ in range(2))
    widened = torch.cat([logits, logits.min(1, keepdim=True).values.expand(-1, 2)], 1)  # classes 3, 4: the lowest
    distill = ((model(images[first_pick], 0) - widened[first_pick]) ** 2).mean()
    labels = F.cross_entropy(model(images[second_pick], 0), targets[second_pick])
    assert float(strategy.loss) == pytest.approx(float(0.7 * distill + beta * labels), rel=1e-6)
    assert plugin.replayed[0] == (8 if beta else 4)  # der draws once per step, derpp twice


def test_memory_bytes_count_the_stored_logits_beside_the_samples():
    model, plugin, replay = TwoHeads(), DarkExperienceReplayPlugin(mem_size=6), MultiTaskReplayPlugin(mem_size=6)
    for each in (plugin, replay):
        each.after_training_exp(SimpleNamespace(model=model, experience=experience(0, 0, 3), device="cpu"))
    assert plugin.memory_bytes == replay.memory_bytes + 6 * 3 * 4  # six samples, three float32 logits each


def test_a_second_experience_trims_the_first_ones_logits_with_its_samples():
    model, plugin = TwoHeads(), DarkExperienceReplayPlugin(mem_size=6)
    for index in (0, 1):
        plugin.after_training_exp(SimpleNamespace(model=model, experience=experience(index, index, 3 - index),
                                                  device="cpu"))
    assert [len(plugin.logits[e]) for e in (0, 1)] == [len(plugin.buffer.tasks[e]) for e in (0, 1)] == [3, 3]
    with torch.no_grad():
        assert torch.equal(torch.stack(plugin.logits[1]), model(stored_images(plugin, 1), 1))


class SegmentationHead(nn.Module):
    """``forward(x, task_label)``: a 1x1 conv's class map at a quarter of the image, upsampled to it as the unified
    model's is."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x, task_label):
        return F.interpolate(self.conv(F.avg_pool2d(x, 4)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_a_segmentation_output_is_stored_pooled_and_matched_pooled_with_the_grown_classes_at_its_lowest():
    torch.manual_seed(0)
    model, generator = SegmentationHead(), torch.Generator().manual_seed(5)
    samples = [[torch.rand(3, 16, 16, generator=generator), torch.randint(0, 3, (16, 16), generator=generator), 0]
               for _ in range(6)]
    plugin = DarkExperienceReplayPlugin(alpha=0.5, beta=0.3, mem_size=4, output_stride=4, seed=2)
    replay = MultiTaskReplayPlugin(mem_size=4, seed=2)
    for each in (plugin, replay):
        each.after_training_exp(SimpleNamespace(model=model, experience=SimpleNamespace(
            dataset=samples, current_experience=0, task_label=0), device="cpu"))
    images, masks = stored_images(plugin, 0), torch.stack([t.long() for t in plugin.buffer.tasks[0].targets])
    with torch.no_grad():
        pooled = F.avg_pool2d(model(images, 0), 4)  # [4, 3, 4, 4]: a 16-pixel map kept as 4 x 4 cells
    assert torch.allclose(torch.stack(plugin.logits[0]), pooled, atol=1e-6)
    assert plugin.memory_bytes == replay.memory_bytes + 4 * 3 * 4 * 4 * 4  # four samples, 3 x 4 x 4 float32 each
    assert plugin.stats()["output_bytes"] == {"0": 4 * 3 * 4 * 4 * 4}

    with torch.no_grad():  # the head grew from 3 classes to 5 and moved on
        grown = nn.Conv2d(3, 5, 1)
        grown.weight[:3], grown.bias[:3] = model.conv.weight + 0.1, model.conv.bias
        model.conv = grown
    strategy = SimpleNamespace(model=model, experience=SimpleNamespace(current_experience=1, task_label=0),
                               device="cpu", mb_x=torch.zeros(2, 3, 16, 16), loss=torch.tensor(0.0),
                               _criterion=lambda output, target: F.cross_entropy(output, target, ignore_index=255))
    draws = torch.Generator()
    draws.set_state(plugin.generator.get_state())
    plugin.before_backward(strategy)

    first_pick, second_pick = (torch.randperm(4, generator=draws)[:2] for _ in range(2))
    lowest = pooled.min(1, keepdim=True).values  # per cell: classes 3 and 4 get the sample's lowest stored logit
    targets = torch.cat([pooled, lowest, lowest], 1)
    distill = ((F.avg_pool2d(model(images[first_pick], 0), 4) - targets[first_pick]) ** 2).mean()
    labels = F.cross_entropy(model(images[second_pick], 0), masks[second_pick])
    assert float(strategy.loss) == pytest.approx(float(0.5 * distill + 0.3 * labels), rel=1e-5)


def test_a_detection_output_keeps_its_boxes_and_gives_new_classes_the_lowest_class_logit():
    stored = [torch.tensor([[[[[-9.0, 1.0, 2.0, 3.0, 0.5, 2.0, -1.0]]]]])]  # [1, A, H, W, 5 + 2]: box, obj, 2 classes
    grown = [torch.zeros(1, 1, 1, 1, 8)]  # the head now has 3 classes
    assert widened(stored, grown, "detection")[0].flatten().tolist() == [-9.0, 1.0, 2.0, 3.0, 0.5, 2.0, -1.0, -1.0]


@pytest.mark.parametrize("strategy", ["er_ace", "er_ace+ewc"])
def test_a_stream_with_segmentation_or_detection_is_refused_in_one_line(strategy):
    with pytest.raises(ConfigError) as refused:
        clmtl.run({"tasks": ["seg", "cls"], "data": {"image_size": 64, "train_size": 4, "val_size": 2}}, strategy)
    assert "segmentation" in str(refused.value) and "\n" not in str(refused.value)


def test_only_the_classes_present_in_the_batch_keep_their_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    masked = present_class_logits(logits, torch.tensor([2, 0]))
    lowest = torch.finfo(torch.float32).min
    assert torch.equal(masked, torch.tensor([[1.0, lowest, 3.0, lowest], [0.5, lowest, 0.5, lowest]]))
    assert float(F.cross_entropy(masked, torch.tensor([2, 0]))) == pytest.approx(
        float(-(torch.log_softmax(torch.tensor([1.0, 3.0]), 0)[1] + torch.log_softmax(torch.tensor([0.5, 0.5]), 0)[0])
              / 2))  # the softmax over the present classes only


def test_er_ace_replaces_the_batch_loss_by_its_asymmetric_one_and_adds_the_stored_samples_full_one():
    torch.manual_seed(0)
    model = TwoHeads()
    model.heads[0] = nn.Linear(5, 5)  # one shared head of five classes: the class scenario after two tasks
    plugin = ERACEPlugin(mem_size=6, ratio=0.5, seed=1)
    plugin.after_training_exp(SimpleNamespace(model=model, experience=experience(0, head=0, classes=3),
                                              device="cpu"))
    x, y = torch.rand(4, 3, 4, 4), torch.tensor([3, 4, 4, 3])  # the new task's classes 3 and 4
    output = model(x, 0)
    strategy = SimpleNamespace(model=model, experience=experience(1, head=0, classes=2), device="cpu", mb_x=x,
                               mb_output=output, mb_y=y, _criterion=F.cross_entropy)
    strategy.loss = plugin.batch_loss(strategy) + 0.25  # in place of the criterion's; 0.25: ewc's term
    draws = torch.Generator()
    draws.set_state(plugin.generator.get_state())
    plugin.before_backward(strategy)

    images, targets = stored_images(plugin, 0), torch.tensor(plugin.buffer.tasks[0].targets)
    picked = torch.randperm(6, generator=draws)[:2]  # ceil(0.5 * 4) stored samples
    asymmetric = -torch.log_softmax(output[:, 3:], 1).gather(1, (y - 3)[:, None]).mean()
    expected = asymmetric + 0.25 + F.cross_entropy(model(images[picked], 0), targets[picked])
    assert float(strategy.loss) == pytest.approx(float(expected), rel=1e-6)
