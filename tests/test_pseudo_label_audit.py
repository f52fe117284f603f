"""benchmarks/pseudo_label_audit.py: what PLOP's pseudo-labels make of old classes' pixels, on hand-made labels, and
the source's masks found under the step's views."""
import pytest
import torch

from benchmark_scripts import load_benchmark
from clmtl.data.relabel import Relabelled
from clmtl.data.shapes import ShapesDataset

audit = load_benchmark("pseudo_label_audit")


def test_each_old_pixel_is_counted_as_its_own_class_another_background_or_ignored():
    truth = torch.tensor([[1, 1, 2, 2, 1]])  # old classes 1 and 2 (old = 3), each pixel labelled background by its step
    pseudo = torch.tensor([[1, 2, 2, 0, 255]])
    assert [audit.OUTCOMES[i] for i in audit.outcomes(pseudo, truth, old=3)[0].tolist()] == [
        "own class", "another old class", "own class", "background", "ignored"]


def test_the_source_and_each_samples_index_in_it_are_found_under_nested_views():
    masks = [torch.full((4, 4), label, dtype=torch.long) for label in (1, 2, 3, 1, 3, 3)]  # disk, square, triangle
    masks[4][0, :2] = masks[5][0, :3] = 0  # the images showing class 3 differ in how many pixels show it
    source = ShapesDataset("segmentation", torch.zeros(6, 3, 4, 4, dtype=torch.uint8), masks)
    step = Relabelled(source, "segmentation", {3: 1}, keep_empty=False)  # the images showing class 3: 2, 4 and 5
    head = Relabelled(step, "segmentation", {1: 5}, subset=2, seed=1)  # two of them
    found, positions = audit.source_view(head)
    assert found is source and len(positions) == 2 and set(positions) < {2, 4, 5}
    for i, position in enumerate(positions):
        assert int((head[i][1] == 5).sum()) == int((masks[position] == 3).sum())


def test_a_folder_without_checkpoints_is_one_line_naming_it(tmp_path):
    with pytest.raises(SystemExit) as refused:
        audit.main([str(tmp_path)])
    assert str(tmp_path) in str(refused.value) and "\n" not in str(refused.value)
