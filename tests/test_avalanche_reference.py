"""``clmtl.studies.avalanche_reference``: Avalanche's stock strategies on a clmtl stream, on a tiny MNIST in the real
idx format (``tiny_mnist``: 4 classes dealt into 2 tasks, learnt in a few iterations).

Training iterations are counted outside the code under test, as optimizer steps between evaluations; a hand-written
torch loop over Avalanche's data loader is the independent reference for ``Naive`` (same weights, bit for bit).
"""
import contextlib
import math

import pytest
import torch
from tiny_mnist import banded_mnist
from torch import nn
from torch.utils.data import DataLoader

import clmtl
import clmtl.studies.avalanche_reference as reference
from clmtl.models.classifier import mlp
from clmtl.studies.avalanche_reference import AVALANCHE_STRATEGIES, train_avalanche

TRAIN_PER_CLASS, TEST_PER_CLASS, BATCH = 50, 10, 32
BATCHES_PER_EPOCH = math.ceil(2 * TRAIN_PER_CLASS / BATCH)  # 4: 100 training images per task


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return banded_mnist(tmp_path_factory.mktemp("mnist"), TRAIN_PER_CLASS, TEST_PER_CLASS)


def make_config(root, scenario="task", iterations=7, epochs=None, seed=0, backbone="mlp"):
    train = {"optimizer": "adam", "lr": 0.01, "batch_size": BATCH, "eval_batch_size": 16, "warmup": 0, "ema": 0,
             "precision": "fp32", "channels_last": False, "parallel_baselines": False}
    train.update({"iterations": iterations} if iterations else {"epochs": epochs})
    return clmtl.load_config({
        "split": {"kind": "classification", "experiences": 2,
                  "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root),
                           "classes": ["0", "1", "2", "3"]}},
        "data": {"image_size": 28, "channels": 1, "hflip": 0.0},
        "model": {"backbone": backbone, "hidden": [32]},
        "train": train, "scenario": scenario, "seed": seed})


def traced(monkeypatch):
    """Record, in order, each optimizer step ('s', with the training batch size) and each forward in eval mode
    ('e'); keep the model built and its outputs in eval mode."""
    events, seen = [], {"eval_outputs": []}
    build, make_optimizer = reference.build_reference_model, reference.make_optimizer

    def build_traced(*args):
        model = seen["model"] = build(*args)

        def hook(module, inputs, output):
            if module.training:
                seen["batch"] = inputs[0].shape[0]
            else:
                events.append(("e", inputs[0].shape[0]))
                seen["eval_outputs"].append(output.detach().clone())

        model.register_forward_hook(hook)
        return model

    def make_optimizer_traced(config, model):
        optimizer = make_optimizer(config, model)
        step = optimizer.step

        def counted_step(*args, **kwargs):
            events.append(("s", seen["batch"]))
            return step(*args, **kwargs)

        optimizer.step = counted_step
        return optimizer

    monkeypatch.setattr(reference, "build_reference_model", build_traced)
    monkeypatch.setattr(reference, "make_optimizer", make_optimizer_traced)
    return events, seen


def steps_per_experience(events) -> list[list[int]]:
    """The training batch sizes of each run of optimizer steps between evaluations."""
    runs, current = [], []
    for kind, size in events + [("e", 0)]:
        if kind == "s":
            current.append(size)
        elif current:
            runs.append(current)
            current = []
    return runs


# --- the budget -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", AVALANCHE_STRATEGIES)
@pytest.mark.parametrize("iterations", [2 * BATCHES_PER_EPOCH + 1, BATCHES_PER_EPOCH, 1])  # into a 3rd epoch, 1 epoch
def test_each_experience_trains_exactly_its_iterations(root, monkeypatch, strategy, iterations):
    events, _ = traced(monkeypatch)
    result = train_avalanche(make_config(root, iterations=iterations), strategy)
    assert [len(run) for run in steps_per_experience(events)] == [iterations, iterations]
    assert result["iterations"] == [iterations, iterations]


@pytest.mark.parametrize("strategy", ["Naive", "Replay"])
def test_an_epoch_budget_trains_whole_epochs_and_replay_keeps_the_loader_length(root, monkeypatch, strategy):
    events, _ = traced(monkeypatch)
    result = train_avalanche(make_config(root, iterations=None, epochs=2), strategy)
    assert [len(run) for run in steps_per_experience(events)] == [2 * BATCHES_PER_EPOCH] * 2
    assert result["iterations"] == [2 * BATCHES_PER_EPOCH] * 2


def test_replay_adds_a_memory_batch_from_the_second_experience(root, monkeypatch):
    events, _ = traced(monkeypatch)
    train_avalanche(make_config(root, iterations=7), "Replay", {"mem_size": 40})
    first, second = steps_per_experience(events)
    assert max(first) == BATCH and max(second) == 2 * BATCH


# --- the accuracy matrix --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
@pytest.mark.parametrize("strategy", AVALANCHE_STRATEGIES)
def test_matrix_shape_range_and_learning(root, strategy, scenario):
    result = train_avalanche(make_config(root, scenario), strategy)
    matrix = result["matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert matrix[0][0] >= 0.9 and matrix[1][1] >= 0.9  # the task just trained
    assert result["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2)
    assert result["strategy"] == f"avalanche:{strategy}" and result["seconds"] > 0


MASKED = -1000.0  # Avalanche's mask_value


def test_units_of_a_head_or_classes_not_trained_yet_are_masked(root, monkeypatch):
    tests = math.ceil(2 * TEST_PER_CLASS / 16)  # eval batches of one test experience (eval_batch_size 16)
    with monkeypatch.context() as patch:
        _, seen = traced(patch)
        matrix = train_avalanche(make_config(root, "task"), "Naive")["matrix"]
    after_first = seen["eval_outputs"][:2 * tests]
    # task: task 1's head is made by its evaluation, every unit masked, so it predicts label 0 (half its test set)
    assert all((output == MASKED).all() for output in after_first[tests:])
    assert not any((output == MASKED).any() for output in after_first[:tests] + seen["eval_outputs"][2 * tests:])
    assert matrix[0][1] == 0.5
    with monkeypatch.context() as patch:
        _, seen = traced(patch)
        matrix = train_avalanche(make_config(root, "class"), "Naive")["matrix"]
    # class: the head grows to classes 2 and 3 when task 1 is evaluated, masked until trained: none predicted
    after_first, after_second = seen["eval_outputs"][:2 * tests], seen["eval_outputs"][2 * tests:]
    assert all(output.shape[1] == 4 for output in after_first[tests:] + after_second)
    assert all((output[:, 2:] == MASKED).all() and (output[:, :2] != MASKED).all() for output in after_first)
    assert not any((output == MASKED).any() for output in after_second)
    assert matrix[0][1] == 0.0


# --- determinism and an independent reference -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", AVALANCHE_STRATEGIES)
def test_the_same_seed_gives_the_same_weights_and_matrix(root, monkeypatch, strategy):
    runs = []
    for _ in range(2):
        with monkeypatch.context() as patch:
            _, seen = traced(patch)
            torch.manual_seed(len(runs))  # whatever the generator's state before, the config's seed decides
            matrix = train_avalanche(make_config(root, "class"), strategy)["matrix"]
        runs.append((matrix, seen["model"].state_dict()))
    (matrix_a, weights_a), (matrix_b, weights_b) = runs
    assert matrix_a == matrix_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def hand_written_naive(config):
    """Task-scenario Naive as a plain loop: a fresh Adam per task over the body and the heads made so far, exactly
    ``iterations`` mini-batches of Avalanche's training loader, heads made as Avalanche makes them (a task's when
    its test data is first evaluated, units masked until trained: an untrained head predicts label 0)."""
    from avalanche.benchmarks.utils.data_loader import TaskBalancedDataLoader

    benchmark = clmtl.build_benchmark(config)
    torch.manual_seed(config.seed)
    body, width = mlp(config.data.channels * config.data.image_size ** 2, config.model.hidden)
    heads = {0: nn.Linear(width, 2)}
    matrix = []
    for index, experience in enumerate(benchmark.stream.train_stream):
        optimizer = torch.optim.Adam([*body.parameters(), *(p for head in heads.values() for p in head.parameters())],
                                     lr=config.train.lr)
        loader = TaskBalancedDataLoader(experience.dataset.train(), oversample_small_groups=True,
                                        batch_size=config.train.batch_size, shuffle=True)
        done, iterations = 0, benchmark.budget(index)[1]
        while done < iterations:
            for x, y, _ in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(heads[index](body(x)), y).backward()
                optimizer.step()
                done += 1
                if done == iterations:
                    break
        row = []
        with torch.no_grad():
            for test_index, test in enumerate(benchmark.stream.test_stream):
                if test_index not in heads:
                    heads[test_index] = nn.Linear(width, 2)
                correct = total = 0
                for x, y, _ in DataLoader(test.dataset.eval(), batch_size=config.train.eval_batch_size):
                    trained = test_index <= index
                    predicted = heads[test_index](body(x)).argmax(1) if trained else torch.zeros_like(y)
                    correct, total = correct + int((predicted == y).sum()), total + len(y)
                row.append(correct / total)
        matrix.append(row)
    return matrix, body, heads


def test_naive_equals_a_hand_written_loop(root, monkeypatch):
    config = make_config(root, "task", iterations=7)
    _, seen = traced(monkeypatch)
    result = train_avalanche(config, "Naive")
    matrix, body, heads = hand_written_naive(config)
    model = seen["model"]
    assert result["matrix"] == matrix
    assert all(torch.equal(a, b) for a, b in zip(model.features.parameters(), body.parameters(), strict=True))
    for task, head in heads.items():
        theirs = model.classifier.classifiers[str(task)].classifier
        assert torch.equal(theirs.weight, head.weight) and torch.equal(theirs.bias, head.bias)


def trained_weights(monkeypatch, config, strategy, hyperparameters=None) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as patch:
        _, seen = traced(patch)
        train_avalanche(config, strategy, hyperparameters or {})
    return seen["model"].state_dict()


def test_stock_synaptic_intelligence_on_the_cpu_is_naive(root, monkeypatch):
    """Avalanche 0.6's SI keeps views of the weights on the CPU, so its penalty is 0: the same weights as Naive.
    Should this fail, Avalanche copies the weights itself and ``si_copies_weights`` can go."""
    config = make_config(root, "task")
    naive = trained_weights(monkeypatch, config, "Naive")
    monkeypatch.setattr(reference, "si_copies_weights", contextlib.nullcontext)
    stock = trained_weights(monkeypatch, config, "SynapticIntelligence", {"si_lambda": 1e6})
    assert all(torch.equal(naive[name], stock[name]) for name in naive)


def test_synaptic_intelligence_runs_with_copied_weights_and_puts_the_stock_function_back(root, monkeypatch):
    from avalanche.training.plugins import SynapticIntelligencePlugin

    stock = SynapticIntelligencePlugin.__dict__["extract_weights"]
    config = make_config(root, "task")
    naive = trained_weights(monkeypatch, config, "Naive")
    weights = trained_weights(monkeypatch, config, "SynapticIntelligence", {"si_lambda": 1e6})
    assert not torch.equal(naive["features.1.weight"], weights["features.1.weight"])
    assert SynapticIntelligencePlugin.__dict__["extract_weights"] is stock


# --- refusals -------------------------------------------------------------------------------------------------


def test_unknown_strategy_backbone_or_hyperparameter_is_one_line(root):
    with pytest.raises(ValueError, match=r"^unknown Avalanche strategy 'GEM'; expected one of Naive, EWC") as error:
        train_avalanche(make_config(root), "GEM")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"^train_avalanche builds the mlp backbone only; model.backbone is "
                                         r"'reduced_resnet18'$"):
        train_avalanche(make_config(root, backbone="reduced_resnet18"), "Naive")
    with pytest.raises(ValueError, match=r"^EWC has no hyperparameter 'lambda'; it takes: ewc_lambda$"):
        train_avalanche(make_config(root), "EWC", {"lambda": 1.0})
    with pytest.raises(ValueError, match=r"it takes: none$"):
        train_avalanche(make_config(root), "Naive", {"mem_size": 10})


def test_hyperparameters_reach_the_strategy(root, monkeypatch):
    import avalanche.training

    made = {}
    replay = avalanche.training.Replay

    def spy(**kwargs):
        made.update(kwargs)
        return replay(**kwargs)

    monkeypatch.setattr(avalanche.training, "Replay", spy)
    train_avalanche(make_config(root, iterations=1), "Replay", {"mem_size": 30.0})
    assert made["mem_size"] == 30 and isinstance(made["mem_size"], int)
    assert made["train_mb_size"] == BATCH and made["eval_mb_size"] == 16 and str(made["device"]) == "cpu"
