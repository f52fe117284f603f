"""Losses: hand-computed values, the anchor/cell assignment, zero-box images, dispatch, and learning on a tiny batch."""
import pytest
import torch
import torch.nn.functional as F

from clmtl.models.anchors import AnchorLayout
from clmtl.stream.tasks import TaskSpec
from clmtl.training.losses import (LEVEL_BALANCE, MultiTaskLoss, classification_loss, detection_loss,
                                   detection_loss_terms, segmentation_loss)

LAYOUT = AnchorLayout()
SIZE = 64


def raw_outputs(batch=2, num_classes=3, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 3, SIZE // s, SIZE // s, 5 + num_classes, generator=g).requires_grad_(requires_grad)
        for s in LAYOUT.strides
    ]


def no_boxes():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}


def test_segmentation_loss_matches_hand_computation_and_ignores_255():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.tensor([[[0, 2], [255, 1]]])
    logp = logits.log_softmax(1)[0]
    expected = -(logp[0, 0, 0] + logp[2, 0, 1] + logp[1, 1, 1]) / 3
    assert segmentation_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)

    all_ignored = segmentation_loss(logits.requires_grad_(), torch.full((1, 2, 2), 255))
    assert all_ignored.item() == 0.0
    all_ignored.backward()  # still part of the graph


def test_classification_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    expected = -(logits[0].log_softmax(0)[0] + logits[1].log_softmax(0)[2]) / 2
    assert classification_loss(logits, torch.tensor([0, 2])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_positives_are_the_matched_anchors_at_the_center_cell_and_its_nearest_neighbours():
    """A 14x14 box centred at (21, 13): by hand, wh-IoU with the anchors is 0.73/0.70/0.70 at stride 8,
    0.34/0.23/0.23 at stride 16 and < 0.11 at stride 32. Grid centers are (2.625, 1.625) at stride 8 ->
    cells (2,1), right (3,1), down (2,2); (1.3125, 0.8125) at stride 16 -> cells (1,0), left (0,0), down (1,1)."""
    raw = raw_outputs(batch=1, requires_grad=True)
    target = [{"boxes": torch.tensor([[14.0, 6.0, 28.0, 20.0]]), "labels": torch.tensor([1])}]
    detection_loss_terms(raw, target, LAYOUT)["box"].backward()
    grads = [torch.zeros_like(r) if r.grad is None else r.grad for r in raw]
    positives = [{tuple(i) for i in (g[..., :4].abs().sum(-1) > 0).nonzero()[:, 1:].tolist()} for g in grads]
    cells0 = {(1, 2), (1, 3), (2, 2)}  # (row, col)
    assert positives[0] == {(a, y, x) for a in range(3) for y, x in cells0}
    assert positives[1] == {(0, 0, 1), (0, 0, 0), (0, 1, 1)}
    assert positives[2] == set()


def test_zero_box_images_train_objectness_only():
    raw = raw_outputs(requires_grad=True)
    terms = detection_loss_terms(raw, [no_boxes(), no_boxes()], LAYOUT)
    assert terms["box"].item() == 0.0 and terms["cls"].item() == 0.0
    expected = sum(w * F.softplus(r[..., 4]).mean() for w, r in zip(LEVEL_BALANCE, raw))  # BCE with target 0
    assert terms["obj"].item() == pytest.approx(expected.item(), rel=1e-5)
    detection_loss(raw, [no_boxes(), no_boxes()], LAYOUT).backward()
    assert all(r.grad[..., :4].abs().sum() == 0 and r.grad[..., 5:].abs().sum() == 0 for r in raw)
    assert all(r.grad[..., 4].abs().sum() > 0 for r in raw)


def test_dispatcher_picks_the_loss_from_the_output_structure():
    loss = MultiTaskLoss(LAYOUT)
    raw = raw_outputs()
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0]]), "labels": torch.tensor([2])}, no_boxes()]
    assert loss(raw, targets).item() == pytest.approx(detection_loss(raw, targets, LAYOUT).item())
    assert loss(tuple(raw), tuple(targets)).item() == pytest.approx(detection_loss(raw, targets, LAYOUT).item())
    seg, seg_y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    assert loss(seg, seg_y).item() == pytest.approx(segmentation_loss(seg, seg_y).item())
    cls, cls_y = torch.randn(2, 5), torch.tensor([1, 4])
    assert loss(cls, cls_y).item() == pytest.approx(classification_loss(cls, cls_y).item())
    with pytest.raises(ValueError, match="shape"):
        loss(torch.randn(2, 3, 4), cls_y)


def test_detection_loss_starts_on_the_scale_of_cross_entropy():
    from clmtl.models.unified import UnifiedModel
    from clmtl.stream.scenario import output_spaces

    torch.manual_seed(0)
    model = UnifiedModel(output_spaces([TaskSpec("det", "detection", ("a", "b", "c", "d"))]), image_size=SIZE)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 20.0], [30.0, 30.0, 60.0, 62.0]]), "labels": torch.tensor([0, 3])},
        no_boxes(),
    ]
    value = MultiTaskLoss(model.anchor_layout)(model(torch.rand(2, 3, SIZE, SIZE), 0), targets).item()
    assert 1.0 < value < 15.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["segmentation", "detection", "classification"])
def test_each_loss_falls_on_a_tiny_batch(kind):
    from clmtl.models.unified import UnifiedModel
    from clmtl.stream.scenario import output_spaces

    torch.manual_seed(0)
    classes = ("background", "a", "b") if kind == "segmentation" else ("a", "b", "c")
    model = UnifiedModel(output_spaces([TaskSpec("t", kind, classes)]), image_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    if kind == "segmentation":
        y = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
        y[0, 8:40, 16:48], y[1, 30:60, 4:30] = 1, 2
        y[:, :2] = 255
    elif kind == "detection":
        y = [
            {"boxes": torch.tensor([[8.0, 16.0, 40.0, 48.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 26.0, 60.0, 50.0]]), "labels": torch.tensor([0, 2])},
        ]
    else:
        y = torch.tensor([0, 2])
    criterion = MultiTaskLoss(model.anchor_layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        loss = criterion(model(x, 0), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
