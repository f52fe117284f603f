"""``benchmarks/task_gap.py``: each row differs from the earlier setup in its one factor, set to the papers' value."""
from benchmark_scripts import load_benchmark

from clmtl.config import load_config
from clmtl.studies.grid import flatten

MNIST, DIGITS = {"format": "torchvision", "dataset": "MNIST", "root": "m"}, {"format": "folder", "root": "d"}


def test_every_row_changes_one_factor_of_the_earlier_setup_to_the_papers():
    gap = load_benchmark("task_gap")
    protocol = gap.Protocol.load(gap.PROTOCOL)
    configs = {row: flatten(load_config(None, base=gap.row_config(protocol, row, MNIST, DIGITS)).to_dict())
               for row in [*gap.FACTORS, "paper protocol"]}
    earlier, paper = configs["earlier setup"], configs["paper protocol"]
    assert (earlier["model.backbone"], earlier["train.optimizer"], earlier["split.data.format"]) == \
        ("yolov8n", "sgd", "folder")
    changed = {row: {key for key in earlier if configs[row][key] != earlier[key]} for row in gap.FACTORS}
    assert changed["data: MNIST"] == {"split.data.format", "split.data.dataset", "split.data.root"}
    assert changed["optimizer: Adam 1e-3, batch 128"] == {"train.optimizer", "train.lr", "train.clip_grad_norm",
                                                          "train.batch_size", "train.reset_optimizer"}
    assert changed["budget: 2,000 iterations"] == {"train.iterations"}
    assert changed["model: MLP 784-400-400"] == {"model.backbone", "data.image_size", "data.channels"}
    for row, keys in changed.items():  # each factor takes the papers' value
        assert all(configs[row][key] == paper[key] for key in keys), row
    everything = set().union(*changed.values())
    unused = {"train.epochs.seg", "train.epochs.det", "train.epochs.cls"}  # iterations, where set, are the budget
    assert {key for key in earlier if earlier[key] != paper[key]} <= everything | unused
