"""Detection distillation (ERD's selection) and pseudo-labels: the selection and the loss on hand-made outputs,
pseudo-boxes and pseudo-pixels by hand, and the streams they refuse in one line."""
import pytest
import torch

import clmtl
from clmtl.errors import ConfigError
from clmtl.models.anchors import AnchorLayout
from clmtl.strategies.det_distill import elastic_selection, response_distillation
from clmtl.strategies.pseudo_labels import with_detections, with_pixels

LAYOUT = AnchorLayout(strides=(8,), anchors=(((8.0, 8.0),),))  # one level, one anchor per cell
LOW, HIGH = -6.0, 6.0  # sigmoid ~0.0025 and ~0.9975


def test_the_elastic_selection_keeps_what_exceeds_the_mean_by_two_standard_deviations():
    scores = torch.tensor([0.1] * 9 + [0.9])  # mean 0.18, standard deviation sqrt(0.576 / 9) = 0.253
    assert elastic_selection(scores, 2.0).tolist() == [False] * 9 + [True]
    assert elastic_selection(torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.0).tolist() == [False, False, True, True]


def hand_made_output():
    """One image, a 6x6 grid of one anchor, 5 + 2 outputs: confident of class 0 at cells (0, 0) and (0, 1), their
    boxes overlapping, nothing elsewhere."""
    raw = torch.full((1, 1, 6, 6, 7), LOW)
    raw[..., :4] = 0.0  # boxes: 8x8 at each cell's center
    for x in (0, 1):
        raw[0, 0, 0, x, 4] = raw[0, 0, 0, x, 5] = HIGH
    raw[0, 0, 0, 1, 4] = 5.0  # the second one a little less confident
    raw[0, 0, 0, 1, :2] = -4.0  # and its box moved to overlap the first's
    return raw


def test_the_loss_on_a_hand_made_output():
    old = hand_made_output()
    new = torch.zeros(1, 1, 6, 6, 8)  # the new model has a third class; its outputs are all 0
    loss = response_distillation([new], [old], LAYOUT)
    # the scores: two near 1, 34 near 6e-6: mean 0.055, standard deviation 0.226, so both confident anchors are
    # selected (above 0.51) and nothing else; on them objectness and the 2 old classes' logits:
    # (6^2 + 6^2 + (-6)^2 + 5^2 + 6^2 + (-6)^2) / 6. NMS at IoU 0.005 keeps the first box alone: (0 + 0 + 0 + 0) / 4
    classification = (36 * 5 + 25) / 6
    assert float(loss) == pytest.approx(classification, rel=1e-6)
    new[0, 0, 0, 0, :4] = 1.0  # the kept anchor's box differs by 1 in each raw output; the other's counts nothing
    new[0, 0, 0, 1, :4] = 3.0
    assert float(response_distillation([new], [old], LAYOUT)) == pytest.approx(classification + 1.0, rel=1e-6)


def test_pseudo_boxes_join_the_targets_unless_a_labelled_box_overlaps_them():
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([3]), "image_id": 7}
    found = {"boxes": torch.tensor([[1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]),
             "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.8])}
    labelled = with_detections(target, found, overlap=0.5)  # the first overlaps the labelled box by IoU 0.81
    assert labelled["boxes"].tolist() == [[0, 0, 10, 10], [20, 20, 30, 30]] and labelled["labels"].tolist() == [3, 1]
    assert labelled["image_id"] == 7 and target["labels"].tolist() == [3]  # the original is left as it was
    assert with_detections(target, found, overlap=0.9)["labels"].tolist() == [3, 0, 1]


def test_pseudo_pixels_fill_background_where_the_previous_model_is_sure_of_an_old_class():
    sure_one, unsure_one, sure_background = [0.0, 5.0], [0.0, 0.1], [5.0, 0.0]
    old = torch.tensor([sure_one, unsure_one, sure_background, sure_one]).T.reshape(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 2]]])  # the last pixel is labelled with a new class
    assert with_pixels(labels, old, score=0.6).tolist() == [[[1, 0], [0, 2]]]  # 0.525 is not sure enough


@pytest.mark.parametrize("strategy,message", [
    ("det_distill", "det_distill acts in the class scenario"),
    ("pseudo_labels", "pseudo_labels acts in the class scenario"),
])
def test_a_stream_outside_the_class_scenario_is_refused_in_one_line(tmp_path, strategy, message):
    config = {"scenario": "task", "data": {"image_size": 64, "train_size": 4, "val_size": 2},
              "tasks": [{"name": "a", "kind": "det", "data": {"classes": ["cross"]}},
                        {"name": "b", "kind": "det", "data": {"classes": ["star"]}}]}
    with pytest.raises(ConfigError) as refused:
        clmtl.run(config, strategy, tmp_path / "run", baselines=False)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_classification_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as refused:
        clmtl.run({"tasks": ["cls"], "data": {"image_size": 64, "train_size": 4, "val_size": 2}}, "pseudo_labels")
    assert "handles segmentation and detection tasks only" in str(refused.value)
