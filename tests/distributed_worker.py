"""One evaluation, one training step and two trained experiences, run by tests/test_distributed.py under torchrun
and as a single process.

``main`` loads the model of a run checkpoint, then writes (rank 0 only) what the test compares: the metrics of every
task's whole validation set, the parameter gradients after one backward pass on a fixed global batch of
classification samples, every process's weights after an experience trained with weight averaging (which each
process must end with alike), and every process's weights after the classification experience trained from the
checkpoint again with BatchNorm frozen (on its running statistics). Frozen, nothing depends on how a global batch is
split any more, so N processes must end where one process does, step for step. The experience trained with weight
averaging (default: the classification task's) may grow a head (class scenario); the frozen run is made for the
default only.

``python tests/distributed_worker.py PLAN.json`` makes the plan's ``main`` calls (``"workers"``: ``[CHECKPOINT, OUT,
EXPERIENCE or null]``), then runs its ``clmtl run`` command lines (``"runs"``), in one process; under torchrun, in
each process. One torchrun start (each of its processes first imports torch, torchvision and Avalanche) then serves
every test.
"""
import json
import sys
from pathlib import Path

import torch
from avalanche.training.plugins import SupervisedPlugin

from clmtl.builders import build_model, make_template
from clmtl.metrics.plugin import task_scores
from clmtl.stream.benchmark import build_benchmark
from clmtl.training import distributed
from clmtl.training.averaging import WeightAveraging
from clmtl.training.checkpoint import checkpoint_config, load_model_checkpoint
from clmtl.training.plugin import to_device


class FrozenBatchNorm(SupervisedPlugin):
    """BatchNorm normalises with its running statistics, and keeps them, during training too."""

    def before_training_iteration(self, strategy, **kwargs) -> None:
        for module in strategy.model.modules():  # after Avalanche's model.train()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def main(checkpoint: str, out: str, experience: int | None = None) -> None:
    torch.set_num_threads(1)
    saved = load_model_checkpoint(checkpoint)
    config = checkpoint_config(saved, checkpoint)
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks, initial_weights=False)
    model.load_state_dict(saved.model)
    template = make_template(config, model, benchmark.tasks, plugins=[], loggers=[])
    scores = task_scores(template.eval(benchmark.stream.test_stream), benchmark.tasks)

    # one step on a fixed global batch: this process's share, then averaged gradients
    label = [t.kind for t in benchmark.tasks].index("classification")
    samples = [benchmark.val_sets[label][i] for i in range(8)][distributed.rank()::distributed.world_size()]
    images, targets = torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])
    model.eval()  # BatchNorm from running statistics: each sample's gradient is independent of the batch
    template._criterion(model(images, label), to_device(targets, "cpu")).backward()
    if distributed.is_distributed():
        distributed.average_gradients(model)
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    template = make_template(config, model, benchmark.tasks, plugins=[WeightAveraging(0.9, 2.0)], loggers=[])
    template.train_epochs = 1
    # each process's global generator in a state of its own, as augmenting its own share of the batches leaves it:
    # what the processes train, and the rows a head grows, must not depend on it
    torch.manual_seed(100 + distributed.rank())
    template.train(benchmark.stream.train_stream[label if experience is None else experience])
    averaged = distributed.gather(model.state_dict()) if distributed.is_distributed() else [model.state_dict()]

    frozen = None
    if experience is None:  # the whole training loop (sharded batches, averaged gradients, Adam, warmup) from the
        model.load_state_dict(saved.model)  # checkpoint, with BatchNorm out of the way
        fp32 = checkpoint_config(saved, checkpoint, overrides=["train.precision=fp32"])
        template = make_template(fp32, model, benchmark.tasks, plugins=[FrozenBatchNorm()], loggers=[], progress=False)
        template.train_epochs = 2
        torch.manual_seed(1)  # the order of the batches (drawn by rank 0 alone under torchrun)
        template.train(benchmark.stream.train_stream[label])
        state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        frozen = distributed.gather(state) if distributed.is_distributed() else [state]
    if distributed.is_main_process():
        torch.save({"scores": scores, "gradients": gradients, "averaged": averaged, "frozen": frozen,
                    "processes": distributed.world_size()}, out)


def run_plan(path: str) -> None:
    """The plan's ``main`` calls, then its runs, in one process group: joined once (seed 0) and left by the last
    run (``clmtl run`` uses a group already there). Leaving and joining again hangs gloo at times."""
    from clmtl.cli import main as clmtl

    plan = json.loads(Path(path).read_text())
    if distributed.launched_by_torchrun():
        distributed.init_from_environment(0, torch.device("cpu"))
    for checkpoint, out, experience in plan.get("workers", []):
        main(checkpoint, out, experience)
    for arguments in plan.get("runs", []):
        if clmtl(["run", *arguments]) != 0:
            raise SystemExit(f"clmtl run {' '.join(arguments)} failed")
    distributed.shutdown()


if __name__ == "__main__":
    run_plan(sys.argv[1])
