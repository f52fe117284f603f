"""One evaluation, one training step and one averaged experience, run by tests/test_distributed.py under torchrun
and as a single process.

It loads the model of a run checkpoint, then writes (rank 0 only) what the test compares: the metrics of every
task's whole validation set, the parameter gradients after one backward pass on a fixed global batch of
classification samples, and every process's weights after an experience trained with weight averaging (which each
process must end with alike). ``python tests/distributed_worker.py CHECKPOINT OUT [EXPERIENCE]``: the experience
trained (default: the classification task's) may grow a head (class scenario).
"""
import sys

import torch

from clmtl import distributed
from clmtl.averaging import WeightAveraging
from clmtl.checkpoint import checkpoint_config, load_model_checkpoint
from clmtl.metrics.plugin import task_scores
from clmtl.benchmark import build_benchmark
from clmtl.builders import build_model, make_template
from clmtl.plugin import to_device


def main(checkpoint: str, out: str, experience: int | None = None) -> None:
    if distributed.launched_by_torchrun():
        distributed.init_from_environment(0)
    torch.set_num_threads(1)
    saved = load_model_checkpoint(checkpoint)
    config = checkpoint_config(saved, checkpoint)
    benchmark = build_benchmark(config)
    model = build_model(config, benchmark.tasks, initial_weights=False)
    model.load_state_dict(saved["model"])
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
    template.train(benchmark.stream.train_stream[label if experience is None else experience])
    averaged = distributed.gather(model.state_dict()) if distributed.is_distributed() else [model.state_dict()]
    if distributed.is_main_process():
        torch.save({"scores": scores, "gradients": gradients, "averaged": averaged,
                    "processes": distributed.world_size()}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(arg) for arg in sys.argv[3:]))
