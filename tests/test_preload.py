"""The in-memory training loader: an epoch is every sample once, as the dataset holds it, in the order torch's
generator draws; only a stream whose samples never change, one task at a time, takes it."""
import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from tiny_mnist import banded_mnist

import clmtl
from clmtl.builders import build_model, make_template
from clmtl.data.preload import PreloadedLoader
from clmtl.stream.benchmark import build_benchmark

BATCH = 4


class LoaderSeen(SupervisedPlugin):
    loader = None

    def before_training_iteration(self, strategy, **kwargs):
        self.loader = strategy.dataloader


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return banded_mnist(tmp_path_factory.mktemp("mnist"), 5, 2)


def settings(root, scenario="class", hflip=0.0):
    return clmtl.load_config({
        "split": {"kind": "classification", "experiences": 2,
                  "data": {"format": "torchvision", "dataset": "MNIST", "root": str(root),
                           "classes": ["0", "1", "2", "3"]}},
        "scenario": scenario, "data": {"image_size": 28, "channels": 1, "hflip": hflip},
        "model": {"backbone": "mlp", "hidden": [8]},
        "train": {"batch_size": BATCH, "iterations": 3, "warmup": 0, "ema": 0, "precision": "fp32",
                  "channels_last": False}})


def test_an_epoch_is_every_sample_once_in_the_order_torch_draws(root):
    dataset = build_benchmark(settings(root)).stream.train_stream[0].dataset
    loader = PreloadedLoader(dataset, BATCH, dataset.collate_fn)
    torch.manual_seed(3)
    order = torch.randperm(len(dataset)).tolist()
    torch.manual_seed(3)
    batches = list(loader)
    assert [len(batch[0]) for batch in batches] == [4, 4, 2] and len(loader) == 3
    images, targets, tasks = (torch.cat(column) for column in zip(*batches))
    assert torch.equal(images, torch.stack([dataset[i][0] for i in order]))
    assert targets.tolist() == [dataset[i][1] for i in order]
    assert tasks.tolist() == [dataset[i][2] for i in order]
    torch.manual_seed(3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader))  # the same seed, the same order


@pytest.mark.parametrize("hflip, preloaded", [(0.0, True), (0.5, False)])
def test_a_stream_whose_samples_never_change_trains_from_memory(root, hflip, preloaded):
    config = settings(root, hflip=hflip)
    benchmark = build_benchmark(config)
    assert benchmark.fixed_samples is preloaded
    seen = LoaderSeen()
    template = make_template(config, build_model(config, benchmark.tasks), benchmark.tasks, [seen], progress=False,
                             preload=benchmark.fixed_samples)
    template.train_for(benchmark.stream.train_stream[0], *benchmark.budget(0))
    assert isinstance(seen.loader, PreloadedLoader) is preloaded
    assert template.clock.train_exp_iterations == 3  # the iteration budget counts its batches the same


def test_an_experience_of_several_tasks_keeps_avalanches_balanced_loader(root):
    config = settings(root, scenario="task")
    benchmark = build_benchmark(config)
    template = make_template(config, build_model(config, benchmark.tasks), benchmark.tasks, progress=False,
                             preload=True)
    first, second = benchmark.stream.train_stream
    template.adapted_dataset = first.dataset.concat(second.dataset)  # what joint trains on in the task scenario
    template.make_train_dataloader()
    assert not isinstance(template.dataloader, PreloadedLoader)
    template.adapted_dataset = first.dataset
    template.make_train_dataloader()
    assert isinstance(template.dataloader, PreloadedLoader)


def test_each_test_set_is_read_once_and_scores_as_avalanches_loader_does(root, monkeypatch):
    from clmtl.metrics.plugin import task_scores
    from clmtl.training import template as template_module

    config = settings(root)
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks)
    plain = make_template(config, model, benchmark.tasks, progress=False)
    plain.train_for(benchmark.stream.train_stream[0], *benchmark.budget(0))
    reads = []
    monkeypatch.setattr(template_module, "PreloadedLoader",
                        lambda *args, **kwargs: reads.append(args[0]) or PreloadedLoader(*args, **kwargs))
    held = make_template(config, model, benchmark.tasks, progress=False, preload=True)
    expected = task_scores(plain.eval(benchmark.stream.test_stream), benchmark.tasks)
    for _ in range(2):
        assert task_scores(held.eval(benchmark.stream.test_stream), benchmark.tasks) == expected
    assert len(reads) == 2  # two test sets, each read at the first evaluation only
