"""PLOP: Local POD against its formula on a hand-made map and against the authors' code, the pseudo-labels and their
weights by hand, the entropy thresholds, and the streams and models it refuses in one line."""
import math

import pytest
import torch
from torch import nn

import clmtl
from clmtl.errors import ConfigError
from clmtl.strategies.plop import (background_summed, entropy_thresholds, local_pod, normalised_entropy, pod_distance,
                                   pseudo_labelled)
from clmtl.training.registry import check_model


def test_local_pod_of_a_hand_made_map():
    maps = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    expected = [1.5, 5.5, 9.5, 13.5, 6, 7, 8, 9,  # scale 1: the row means, then the column means
                0.5, 4.5, 2, 3,  # scale 2, top left [[0, 1], [4, 5]]
                2.5, 6.5, 4, 5,  # top right [[2, 3], [6, 7]]
                8.5, 12.5, 10, 11,  # bottom left
                10.5, 14.5, 12, 13]  # bottom right
    assert local_pod(maps, (1, 2)).tolist() == [expected]


def authors_local_pod(x, spp_scales):
    """The authors' ``_local_pod`` (no normalisation), as its code is."""
    b, w, emb = x.shape[0], x.shape[-1], []
    for scale in spp_scales:
        k = w // scale
        for i in range(scale):
            for j in range(scale):
                tensor = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                emb.append(tensor.mean(dim=3).view(b, -1))
                emb.append(tensor.mean(dim=2).view(b, -1))
    return torch.cat(emb, dim=1)


def test_local_pod_and_its_distance_equal_the_authors_code():
    generator = torch.Generator().manual_seed(0)
    new, old = torch.randn(3, 5, 8, 8, generator=generator), torch.randn(3, 5, 8, 8, generator=generator)
    assert torch.allclose(local_pod(new), authors_local_pod(new, [1, 2, 4]))
    embeddings = [authors_local_pod(maps ** 2, [1, 2, 4]) for maps in (new, old)]
    reference = torch.linalg.vector_norm(embeddings[0] - embeddings[1], dim=-1).mean()
    assert float(pod_distance(new, old)) == pytest.approx(float(reference), rel=1e-6)
    assert float(pod_distance(new, new)) == 0.0


def test_new_classes_are_summed_into_the_background():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])  # background, old 1, old 2, new 3, new 4
    assert background_summed(logits, old=3).tolist() == [[10.0, 2.0, 3.0]]


def test_pseudo_labels_and_image_weights_by_hand():
    confident, unsure = [0.0, 9.0, 0.0], [0.0, 0.1, 0.0]  # old model's logits: sure of class 1 / nearly uniform
    old_logits = torch.tensor([confident, unsure, confident, unsure]).T.reshape(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0], [4, 0]]])  # a new class at the third pixel
    thresholds = torch.tensor([0.5, 0.5, 0.5])
    assert float(normalised_entropy(old_logits)[0, 0, 0]) < 0.01 < 0.99 < float(normalised_entropy(old_logits)[0, 0, 1])
    labelled, weight = pseudo_labelled(labels, old_logits, thresholds)
    assert labelled.tolist() == [[[1, 255], [4, 255]]]  # the sure background pixel takes class 1, the others ignored
    assert weight.tolist() == pytest.approx([1 / 3])  # one of its three background pixels was confident
    _, weight = pseudo_labelled(torch.full((1, 2, 2), 4), old_logits, thresholds)
    assert weight.tolist() == [1.0]  # no background pixel: the image keeps its weight


def test_the_thresholds_are_each_classs_median_entropy_on_background_at_least_the_minimum():
    entropy_of = [[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]  # classes 1, 1, 1, 0
    old_logits = torch.tensor(entropy_of).T.reshape(1, 3, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 0]]])
    entropies = normalised_entropy(old_logits).flatten()
    thresholds = entropy_thresholds(old_logits, labels, minimum=0.001)
    assert float(thresholds[1]) == pytest.approx(float(entropies[:3].median()))
    assert float(thresholds[0]) == pytest.approx(float(entropies[3]))
    assert float(thresholds[2]) == pytest.approx(0.001)  # never predicted
    assert float(entropy_thresholds(old_logits, labels, minimum=0.99)[1]) == pytest.approx(0.99)
    assert math.isclose(float(entropies[2]), float(entropies[:3].median()))  # logit 2: between 5 and 1


def test_a_model_without_a_pyramid_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        check_model("plop", nn.Linear(2, 2))
    assert "strategy plop needs a model with a backbone and an FPN neck" in str(refused.value)


def test_a_stream_outside_the_class_scenario_is_refused_in_one_line(tmp_path):
    config = {"scenario": "task", "data": {"image_size": 64, "train_size": 4, "val_size": 2},
              "tasks": [{"name": "a", "kind": "seg", "data": {"classes": ["disk"]}},
                        {"name": "b", "kind": "seg", "data": {"classes": ["ring"]}}]}
    with pytest.raises(ConfigError) as refused:
        clmtl.run(config, "plop", tmp_path / "run", baselines=False)
    assert "plop acts in the class scenario" in str(refused.value) and "\n" not in str(refused.value)
