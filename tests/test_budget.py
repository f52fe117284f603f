"""Training budgets: ``train.iterations`` counts optimizer steps across epoch boundaries (the papers' budget), a task
entry's own epochs or iterations win, and ``train.reset_optimizer=false`` keeps one optimizer state for the stream."""
import pytest
from avalanche.training.plugins import SupervisedPlugin
from tiny_mnist import banded_mnist

import clmtl
from clmtl.builders import build_model, make_template
from clmtl.config import TaskConfig
from clmtl.stream.benchmark import build_benchmark, task_budget

TRAIN_PER_CLASS, BATCH = 5, 4  # 10 images per task: 3 batches per epoch


class StepCounter(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.steps: list[int] = []

    def before_training_exp(self, strategy, **kwargs):
        self.steps.append(0)

    def after_update(self, strategy, **kwargs):
        self.steps[-1] += 1


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return banded_mnist(tmp_path_factory.mktemp("mnist"), TRAIN_PER_CLASS, 2)


def config(root, **train):
    return clmtl.load_config({
        "split": {"kind": "classification", "experiences": 2,
                  "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root),
                           "classes": ["0", "1", "2", "3"]}},
        "data": {"image_size": 28, "channels": 1, "hflip": 0.0}, "model": {"backbone": "mlp", "hidden": [8]},
        "train": {"batch_size": BATCH, "warmup": 0, "ema": 0, "precision": "fp32", "channels_last": False, **train}})


def train_stream(settings):
    benchmark = build_benchmark(settings)
    counter = StepCounter()
    template = make_template(settings, build_model(settings, benchmark.tasks), benchmark.tasks, [counter],
                             progress=False)
    for label, experience in enumerate(benchmark.stream.train_stream):
        template.train_for(experience, *benchmark.budget(label))
    return counter.steps, template


@pytest.mark.parametrize("iterations", [2, 3, 7])
def test_iterations_count_steps_across_epoch_boundaries_in_every_experience(root, iterations):
    steps, template = train_stream(config(root, iterations=iterations, epochs=1))
    assert steps == [iterations, iterations]
    assert template.clock.train_exp_iterations == iterations


def test_epochs_still_count_epochs(root):
    steps, _ = train_stream(config(root, epochs=2))
    assert steps == [6, 6]  # 2 epochs of ceil(10 / 4) batches


def test_a_task_entrys_own_budget_wins(root):
    settings = config(root, iterations=9, epochs={"cls": 4})
    assert task_budget(TaskConfig(name="a", kind="classification"), settings) == (4, 9)
    assert task_budget(TaskConfig(name="a", kind="classification", epochs=2), settings) == (2, None)
    assert task_budget(TaskConfig(name="a", kind="classification", iterations=5), settings) == (4, 5)
    with pytest.raises(clmtl.config.ConfigError, match="epochs or iterations, not both"):
        clmtl.load_config({"tasks": [{"name": "a", "kind": "cls", "epochs": 1, "iterations": 2}]})


@pytest.mark.parametrize("reset, steps", [(True, 5), (False, 10)])
def test_the_optimizer_state_is_kept_across_experiences_unless_reset(root, reset, steps):
    _, template = train_stream(config(root, iterations=5, optimizer="adam", reset_optimizer=reset))
    shared = [template.optimizer.state[p] for p in template.model.body.parameters()]  # the second head is new
    assert [int(state["step"]) for state in shared] == [steps] * len(shared)
