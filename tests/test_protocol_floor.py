"""benchmarks/protocol_floor.py: the bare-loop floor beside clmtl's naive training of a protocol."""
import re

from benchmark_scripts import load_benchmark
from tiny_mnist import ten_digit_mnist


def test_it_times_clmtl_beside_the_floor_and_refuses_a_root_without_mnist(tmp_path, capsys):
    script = load_benchmark("protocol_floor")
    root = ten_digit_mnist(tmp_path / "mnist", 3)
    assert script.main(["--protocol", "split_mnist_2019", "--root", str(root), "--iterations", "2"]) == 0
    out = capsys.readouterr().out
    floor, training = map(float, re.search(r"floor ([\d.]+) s; clmtl naive ([\d.]+) s training", out).groups())
    assert floor >= 0 and training >= 0  # printed to 0.1 s: a warm 10-step training may read 0.0
    assert "90 trainings (5 seeds) on 2 cores" in out  # 3 scenarios x 6 methods of the 2019 file
    assert script.main(["--protocol", "split_mnist_2019", "--root", str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.startswith(f"protocol_floor: {tmp_path / 'nothing'}: neither torchvision's")
