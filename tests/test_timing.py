"""measure_latency: warm-up calls are not timed; the median and IQR come from the timed calls."""
import pytest

import clmtl.studies.timing as timing


def test_median_and_iqr_of_the_timed_calls_only(monkeypatch):
    clock = iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002, 3.0, 3.010])  # durations 1, 4, 2, 10 ms
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    latency = timing.measure_latency(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    assert latency.median_ms == pytest.approx(3.0)  # median of 1, 2, 4, 10
    assert latency.iqr_ms == pytest.approx(5.5 - 1.75)  # numpy's linear percentiles: q3 5.5, q1 1.75
    with pytest.raises(ValueError, match="repeats"):
        timing.measure_latency(lambda: None, repeats=0)


def test_cases_run_round_robin_and_warm_up_runs_are_dropped():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    latencies = timing.time_interleaved(cases, repeats=3, warmup=2)
    assert calls == list("abc") * 5
    assert {name: len(latency.runs_ms) for name, latency in latencies.items()} == {"a": 3, "b": 3, "c": 3}


def test_quartiles_of_the_runs():
    entry = timing.Latency((1.0, 2.0, 3.0, 4.0, 10.0)).as_dict()
    assert entry["median_ms"] == pytest.approx(3.0)
    assert entry["q25_ms"] == pytest.approx(2.0) and entry["q75_ms"] == pytest.approx(4.0)
    assert entry["iqr_ms"] == pytest.approx(2.0) and entry["repeats"] == 5
