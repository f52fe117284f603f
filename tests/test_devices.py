"""Devices and threads: train.device and train.threads resolution, precision per device, every part of a run on an
explicit device, no tensor made on a hard-coded one; tests marked ``gpu`` run only where CUDA is."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clmtl.errors import ConfigError
from clmtl.training.devices import resolve_device, resolve_threads
from clmtl.training.precision import GradientScaler, resolve_precision

ROOT = Path(__file__).parents[1]
TINY = ["data.train_size=8", "data.val_size=4", "data.image_size=64", "train.epochs=1", "train.batch_size=4",
        "output.overlays=1", "train.threads=1", "train.parallel_baselines=false", "strategy.replay.mem_size=6",
        "train.ema=0.9", "train.ema_tau=2"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_is_the_cpu_here_and_cpu_is_the_cpu():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_an_absent_cuda_device_is_a_one_line_error(spec):
    with pytest.raises(ConfigError, match=re.escape(f"train.device: {spec} asked for, but this machine has no CUDA "
                                                    "device")) as error:
        resolve_device(spec)
    assert "\n" not in str(error.value)


def test_an_absent_device_stops_the_command_before_it_writes_anything(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from clmtl.cli import main

    code = main(["run", "--out", str(tmp_path / "out"), "train.device=cuda", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no CUDA device" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("environment, cores, expected", [
    ({}, 2, 2),  # one process: every usable core
    ({"LOCAL_WORLD_SIZE": "2"}, 2, 1),  # torchrun, two processes on this machine: half each
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1),  # never fewer than one
    ({"LOCAL_WORLD_SIZE": "2"}, 16, 8),
    ({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "2"}, 16, 3),  # set explicitly: it wins
])
def test_auto_threads_are_the_usable_cores_shared_by_the_local_processes(monkeypatch, environment, cores, expected):
    import clmtl.training.devices as devices

    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(devices, "usable_cores", lambda: cores)
    assert resolve_threads("auto") == expected
    assert resolve_threads(5) == 5


def test_importing_ultralytics_through_clmtl_leaves_the_thread_setting_and_torch_save_alone():
    """ultralytics sets OMP_NUM_THREADS=1 when it is unset ('auto' would then read 1 as the user's choice) and
    replaces torch.save with a wrapper that retries failures."""
    code = ("import os, torch; import clmtl.ultralytics_shim, ultralytics; "
            "from clmtl.training.devices import resolve_threads, usable_cores; "
            "print(os.environ.get('OMP_NUM_THREADS'), resolve_threads('auto') == usable_cores(), "
            "torch.save.__module__)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["None", "True", "torch.serialization"], done.stderr[-2000:]


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("auto", "mps") == "fp32"


def test_the_gradient_scaler_is_a_pass_through_except_for_fp16():
    """Off (fp32, bf16): the gradients and the step are exactly those of loss.backward() and optimizer.step()."""
    results = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        loss = layer(torch.ones(4, 3)).pow(2).sum()
        if use_scaler:
            scaler = GradientScaler("bf16", "cpu")
            scaler.backward(loss, optimizer)
            scaler.step(optimizer)
        else:
            loss.backward()
            optimizer.step()
        results.append([p.detach().clone() for p in layer.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert GradientScaler("fp16", "cpu").enabled and not GradientScaler("bf16", "cpu").enabled


ALLOWED_CPU = [  # (file, text on the line): device names, defaults, and checkpoint files saved and read on the CPU
    ("clmtl/config.py", '"auto", "cpu", "cuda", "mps"'),
    ("clmtl/training/devices.py", 'DEVICE_CHOICES = ("auto", "cpu"'),
    ("clmtl/training/devices.py", 'torch.device("mps" if _mps_available() else "cpu")'),
    ("clmtl/training/devices.py", 'device.type not in ("cpu", "cuda", "mps")'),
    ("clmtl/training/precision.py", 'device: torch.device | str = "cpu") -> str:'),
    ("clmtl/training/precision.py", 'if kind == "cpu":'),
    ("clmtl/training/precision.py", 'device: torch.device | str = "cpu") -> torch.autocast:'),
    ("clmtl/models/unified.py", 'torch.load(path, map_location="cpu", weights_only=True)'),
    ("clmtl/training/checkpoint.py", 'atomic_torch_save(to_device(checkpoint.to_dict(), "cpu"), path)'),
    ("clmtl/io.py", 'map_location: str | torch.device = "cpu"'),
    ("clmtl/training/plugin.py", 'non_blocking=torch.device(device).type != "cpu"'),  # a copy to the CPU blocks
    # saved: where it was
    ("clmtl/training/plugin_state.py", 'value.device.type == "cpu" else {KIND: "accelerator"'),
    # handed over as checkpoints hold them
    ("clmtl/training/distributed.py", 'to_device(plugin_states(plugins), "cpu")'),
]


def test_no_tensor_is_made_on_a_hard_coded_cpu():
    """Every "cpu" in clmtl/ and strategies/ is a device name, a default or checkpoint I/O, nothing else."""
    found = [(str(path.relative_to(ROOT)), line.strip()) for folder in ("clmtl", "strategies")
             for path in sorted((ROOT / folder).rglob("*.py")) for line in path.read_text().splitlines()
             if '"cpu"' in line or "'cpu'" in line]
    unexpected = [(path, line) for path, line in found
                  if not any(path == file and text in line for file, text in ALLOWED_CPU)]
    assert not unexpected, unexpected
    assert len(found) == len(ALLOWED_CPU)  # the allowed list describes what is there, not more


@pytest.mark.slow
def test_every_strategy_eval_export_and_resume_run_on_an_explicit_device(tmp_path, clmtl_cli):
    """train.device=cpu given explicitly (cuda on a GPU machine): a run with every stateful strategy, its checkpoint
    evaluated, exported and resumed, all on that device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = "ewc+replay+lwf+layerlr+bnfreeze"
    config = [f"train.device={device}", *TINY, "output.checkpoint_every=1"]
    run = clmtl_cli("run", "--strategy", strategy, "--out", tmp_path / "run", *config)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["device"].startswith(device) and results["config"]["train"]["device"] == device
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    assert all(t.device.type == "cpu" for t in torch.load(checkpoint, weights_only=True)["model"].values())
    evaluated = clmtl_cli("eval", "--checkpoint", checkpoint, "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {name: scores[m] for name, scores in metrics.items() for m in scores if m in ("mIoU", "mAP50_95", "top1")
            } == results["final"]
    exported = clmtl_cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "m.pt")
    assert exported.returncode == 0, exported.stderr[-3000:]
    (tmp_path / "run" / "results.json").unlink()
    (tmp_path / "run" / "checkpoints" / "exp2.pt").unlink()  # resume from the second experience's checkpoint
    (tmp_path / "run" / "checkpoints" / "last.pt").unlink()
    (tmp_path / "run" / "checkpoints" / "last.pt").hardlink_to(tmp_path / "run" / "checkpoints" / "exp1.pt")
    resumed = clmtl_cli("run", "--resume", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["matrix"] == results["matrix"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_trains_on_cuda_in_mixed_precision(tmp_path, precision):
    from clmtl.config import load_config
    from clmtl.runner import run
    from clmtl.training.registry import strategy_schemas

    config = load_config(None, [*TINY, "train.device=cuda", f"train.precision={precision}"],
                         strategies=strategy_schemas())
    results = run(config, "ewc+replay+lwf", tmp_path, baselines=False)
    assert results.device.startswith("cuda") and results.precision == precision
    assert all(value is not None for row in results.matrix for value in row)
