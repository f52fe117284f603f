"""iCaRL: herding against Avalanche's herding and a hand case, its loss against Avalanche's ``ICaRLLossPlugin``,
the nearest-mean classifier by hand, and in a run: exemplars trimmed to herding prefixes, the nearest-mean classifier
scoring the same training as the softmax, refusals in one line."""
import json

import pytest
import torch
import torch.nn.functional as F
from avalanche.training.losses import ICaRLLossPlugin
from avalanche.training.storage_policy import HerdingSelectionStrategy
from torch import nn

import clmtl
from clmtl.errors import ConfigError
from clmtl.strategies.icarl import herding_order, icarl_loss, interleaved, nearest_mean_scores
from clmtl.training.checkpoint import load_checkpoint


def test_herding_picks_what_avalanches_herding_picks_on_normalised_features():
    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(0)).double()
    reference = HerdingSelectionStrategy.make_sorted_indices_from_features(None, F.normalize(features, dim=1))
    assert herding_order(features, 40) == reference
    assert herding_order(features, 7) == reference[:7]  # a prefix: the memory trims by cutting it


def test_herding_on_a_hand_made_set():
    # unit vectors at 0, 90 and 180 degrees and one at 45: the mean of all is (r / 4, (1 + r) / 4) = (0.177, 0.427),
    # r = 1/sqrt(2); the 45-degree one is nearest to it alone; paired with it, the one at 180 degrees gives the mean
    # (-0.146, 0.354), 0.331 away, the one at 90 degrees (0.354, 0.854), 0.462 away, the one at 0 degrees 0.681 away
    r = 2 ** -0.5
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [r, r]])
    mean = features.mean(0)
    assert torch.allclose(mean, torch.tensor([r / 4, (1 + r) / 4]))
    first = min(range(4), key=lambda i: float((features[i] - mean).norm()))
    second = min((i for i in range(4) if i != first), key=lambda i: float(((features[first] + features[i]) / 2
                                                                           - mean).norm()))
    assert (first, second) == (3, 2)
    assert herding_order(features * 5, 2) == [3, 2]  # normalised first: the scale does not matter


def test_interleaving_keeps_every_prefix_balanced():
    assert interleaved([[4, 5, 6], [1], [7, 8]]) == [4, 1, 7, 5, 8, 6]


def test_the_loss_is_avalanches_icarl_loss():
    generator = torch.Generator().manual_seed(1)
    logits, old_logits = torch.randn(5, 6, generator=generator), torch.randn(5, 4, generator=generator)
    labels = torch.tensor([4, 5, 4, 1, 5])
    reference = ICaRLLossPlugin()
    reference.old_classes, reference.old_logits = [0, 1, 2, 3], old_logits
    assert float(icarl_loss(logits, labels, old_logits)) == pytest.approx(float(reference(logits, labels)), rel=1e-6)
    assert float(icarl_loss(logits, labels, None)) == pytest.approx(float(ICaRLLossPlugin()(logits, labels)),
                                                                    rel=1e-6)


def test_the_nearest_mean_scores_by_hand():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [float("nan")] * 2])  # class 2 has no exemplar
    scores = nearest_mean_scores(torch.tensor([[3.0, 1.0], [0.0, -2.0]]), means)
    unit = torch.tensor([3.0, 1.0]) / 10 ** 0.5
    assert float(scores[0, 0]) == pytest.approx(-float(((unit - means[0]) ** 2).sum()))
    assert scores[0].argmax() == 0 and scores[1].argmax() == 0  # (0, -1) is as far from (0, 1) as can be
    assert scores[0, 2] == torch.finfo(torch.float32).min


SPLIT = {"scenario": "class", "seed": 0, "output": {"overlays": 0},
         "data": {"image_size": 64, "train_size": 24, "val_size": 12},
         "train": {"epochs": 1, "batch_size": 8, "threads": 1},
         "split": {"kind": "cls", "data": {"format": "shapes"}, "experiences": 2}}


@pytest.mark.slow
def test_a_run_keeps_herding_prefixes_and_scores_the_same_training_by_nearest_mean_or_softmax(tmp_path):
    runs = {}
    for classifier in ("nme", "softmax"):
        config = {**SPLIT, "strategy": {"icarl": {"mem_size": 12, "classifier": classifier}}}
        runs[classifier] = clmtl.run(config, "icarl", tmp_path / classifier, baselines=False)
    first, second = (load_checkpoint(tmp_path / c / "checkpoints" / "last.pt") for c in ("nme", "softmax"))
    assert all(torch.equal(first["model"][name], second["model"][name]) for name in first["model"])
    nme, softmax = (json.loads((tmp_path / c / "results.json").read_text()) for c in ("nme", "softmax"))
    assert nme["matrix"] != softmax["matrix"]  # one training, two classifiers
    assert nme["strategy_stats"]["ICaRLPlugin"]["stored"] == {"0": 6, "1": 6}  # the first trimmed from 12 to 6
    assert nme["memory_bytes"] > 12 * 3 * 64 * 64  # the exemplars, the means and the previous model


@pytest.mark.parametrize("strategy,message", [
    ("icarl", "strategy icarl handles classification tasks only"),
    ("icarl+er_ace", "cannot compose icarl and er_ace: each takes over the criterion"),
])
def test_streams_and_hybrids_it_cannot_act_on_are_refused_in_one_line(strategy, message):
    with pytest.raises(ValueError) as refused:
        tasks = ["seg", "cls"] if strategy == "icarl" else ["cls"]
        clmtl.run({"tasks": tasks, "data": {"image_size": 64, "train_size": 4, "val_size": 2}}, strategy)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_model_without_embeddings_is_refused_in_one_line():
    body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    with pytest.raises(ConfigError) as refused:
        clmtl.run({**SPLIT, "split": {**SPLIT["split"], "experiences": 2}}, "icarl", model=body)
    assert "strategy icarl needs a model with embed(x, head)" in str(refused.value)
    assert "\n" not in str(refused.value)

