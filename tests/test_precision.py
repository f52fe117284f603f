"""Training precision (bfloat16 autocast where the CPU has it) and channels_last weights: what changes and what not."""
import pytest
import torch

import clmtl.training.precision as precision
from clmtl.builders import build_model, make_template
from clmtl.config import load_config
from clmtl.stream.benchmark import build_benchmark
from clmtl.training.losses import MultiTaskLoss
from clmtl.training.plugin import task_batch_loss

TINY = ["data.train_size=4", "data.val_size=4", "data.image_size=64", "train.batch_size=4", "train.threads=1"]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert precision.resolve_precision("auto") == expected
    assert precision.resolve_precision("fp32") == "fp32" and precision.resolve_precision("bf16") == "bf16"


def test_an_unknown_precision_is_a_clear_config_error():
    with pytest.raises(ValueError, match="train.precision"):
        load_config(None, ["train.precision=fp64"])


@pytest.fixture(scope="module")
def setup():
    config = load_config(None, TINY)
    benchmark = build_benchmark(config)
    batches = {}
    for label in range(3):
        data = benchmark.stream.train_stream[label].dataset
        batches[label] = data.collate_fn([data[i] for i in range(4)])
    return config, benchmark, batches


def conv_output_dtypes(model, run):
    """The dtypes the model's convolutions return while ``run()`` executes."""
    dtypes = set()
    hooks = [m.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


@pytest.mark.parametrize("label", [0, 1, 2])
def test_bf16_training_runs_convolutions_in_bfloat16_and_losses_in_float32(setup, label):
    config, benchmark, batches = setup
    model = build_model(config, benchmark.tasks).eval()  # eval: BN statistics do not move between the forwards
    template = make_template(config, model, benchmark.tasks, [], [])
    template.is_training = True
    criterion = MultiTaskLoss(model.anchor_layout)
    losses = {}
    for name in ("fp32", "bf16"):
        template.precision = name
        dtypes = conv_output_dtypes(model, lambda: losses.__setitem__(name, task_batch_loss(template, batches[label],
                                                                                            label)))
        assert dtypes == {torch.bfloat16 if name == "bf16" else torch.float32}
    assert losses["bf16"].dtype == torch.float32
    reference = criterion(model(batches[label][0], label), batches[label][1])  # plain float32 forward
    assert losses["fp32"].item() == pytest.approx(reference.item(), rel=1e-6)
    # bfloat16 keeps 8 bits of mantissa: the loss moves by a few per cent, not more
    assert losses["bf16"].item() == pytest.approx(reference.item(), rel=0.05)
    assert losses["bf16"].item() != reference.item()


def test_evaluation_runs_in_float32_whatever_the_training_precision(setup):
    config, benchmark, batches = setup
    model = build_model(config, benchmark.tasks).eval()
    template = make_template(config, model, benchmark.tasks, [], [])
    template.precision, template.is_training = "bf16", False
    assert conv_output_dtypes(model, lambda: template.task_output(batches[2][0], 2)) == {torch.float32}


def test_channels_last_stores_conv_weights_nhwc_and_computes_the_same_outputs(setup):
    config, benchmark, batches = setup
    nhwc = build_model(config, benchmark.tasks).eval()
    nchw = build_model(load_config(None, [*TINY, "train.channels_last=false"]), benchmark.tasks).eval()
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert all(p.is_contiguous() for p in nchw.parameters())
    x = batches[0][0]
    with torch.no_grad():
        for label in range(3):
            got, expected = nhwc(x, label), nchw(x, label)
            for g, e in zip(*(out if isinstance(out, list) else [out] for out in (got, expected))):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
