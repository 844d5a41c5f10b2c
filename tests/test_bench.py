"""The benchmark suite: its quick mode end to end, interleaved timing, the lungmask peer's process."""

import importlib.util
import json
import math

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from radlogics_repro.bench import __main__ as bench_main
from radlogics_repro.bench import suite, timing


def test_interleaved_alternates_after_warmup_and_takes_medians(monkeypatch):
    calls = []
    clock = iter(np.arange(0.0, 100.0, 1.0))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock) ** 2 / 10)
    result = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    # perf_counter is read twice per timed call, t(k) = k^2 / 10: timed call i lasts (4i + 1) / 10 s
    assert result["a"].all_seconds == pytest.approx([0.1, 0.9, 1.7])
    assert result["b"].all_seconds == pytest.approx([0.5, 1.3, 2.1])
    assert result["a"].seconds == pytest.approx(0.9) and result["b"].rate(13) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="repeats"):
        timing.interleaved({"a": lambda: None}, repeats=0)


def test_a_child_reports_its_own_peak_memory_not_its_parents():
    import subprocess
    import sys

    from radlogics_repro.bench.timing import own_peak_rss_bytes

    ballast = np.ones(400_000_000 // 8)  # 400 MB resident in this process
    code = "from radlogics_repro.bench.timing import own_peak_rss_bytes; print(own_peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout)
    assert own_peak_rss_bytes() > ballast.nbytes > 10 * child  # ru_maxrss would give >= 400 MB


def test_quick_suite_has_every_section_with_its_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "lungmask_available", lambda: False)  # no torch needed here
    out = tmp_path / "bench.md"
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("bench", overrides=["quick=true", f"out={out}"])
        result = bench_main.run(cfg, "python -m radlogics_repro.bench quick=true")
    assert result.failed == []
    assert {row.section for row in result.rows} == set(suite.SECTIONS)

    def rows(section, *words):
        return [r for r in result.rows if r.section == section and all(w in r.figure for w in words)]

    def finite(row, minimum=1e-9):
        return row.ratio is not None and math.isfinite(row.ratio) and row.ratio >= minimum

    roofs = rows("roof", "roof: the faster")
    assert len(roofs) == 2 and finite(rows("roof", "bfloat16 roof")[0])
    assert all(finite(r) for r in rows("roof", "3x3 convolution"))  # beside the largest matmul
    for task in ("U-Net", "ResNet-50"):   # as analyze runs them (target) and as trained
        folded = rows("models", task, "inference,", "BatchNorm folded, batch")
        assert folded and all(finite(r) and r.met is not None for r in folded)
        as_trained = [r for r in rows("models", task, "inference,") if "BatchNorm folded" not in r.figure]
        assert as_trained and all(finite(r) and r.met is None for r in as_trained)
        assert finite(rows("models", task, "inference, float32: BatchNorm folded speed-up")[0])
    assert finite(rows("models", "U-Net", "training,")[0])
    assert finite(rows("models", "U-Net", "inference: mixed_bfloat16 speed-up")[0])
    assert finite(rows("pipeline")[0]) and rows("pipeline")[0].target == ">= 0.9"
    assert finite(rows("gradcam", "fused")[0])
    analyze = {r.figure.split(",")[0]: r for r in rows("analyze")}
    assert analyze["total"].met is not None and "lung slices" in rows("analyze", "total")[0].figure
    assert rows("analyze", "peak resident memory")[0].measured.endswith("GB")
    assert all(finite(r, minimum=0.0) for r in rows("analyze", "stage:"))  # stages may round to 0 s
    if importlib.util.find_spec("SimpleITK"):
        assert finite(rows("dicom")[0])
    assert rows("peer")[0].measured.startswith("skipped: lungmask is not installed")

    text = out.read_text()
    assert "python -m radlogics_repro.bench quick=true" in text and "- commit: " in text
    assert "QUICK mode" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| section | figure | measured | reference (same run) | ratio | target")
    assert {line.split("|")[1].strip() for line in table[1:]} == set(suite.SECTIONS)


def test_unknown_section_is_a_user_error():
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("bench", overrides=["sections=[roof,speed]"])
        with pytest.raises(suite.BenchError, match="unknown"):
            bench_main.settings_from_config(cfg)


@pytest.mark.skipif(not suite.lungmask_available(), reason="lungmask (optional extra 'bench') not installed")
def test_lungmask_peer_process_segments_a_small_volume(tmp_path):
    from radlogics_repro.bench.study import run_child

    hu = np.full((3, 64, 64), -1000.0, np.float32)
    hu[:, 8:56, 8:56] = 40.0  # a body ...
    hu[:, 16:48, 14:30] = -850.0  # ... with two air-filled "lungs"
    hu[:, 16:48, 34:50] = -850.0
    np.save(tmp_path / "hu.npy", hu)
    child = run_child("radlogics_repro.bench.peer_child",
                      ["--hu", str(tmp_path / "hu.npy"), "--batch", "2", "--slices", "2"], tmp_path, 300)
    assert child.exit_code == 0, child.log_tail
    result = child.result
    assert result["slices"] == 2 and result["network_calls"] == 1 and result["batch"] == 2
    assert 0 < result["network_s"] <= result["total_s"]
    assert 90 < result["gflop_per_slice"] < 100  # R231 at 256 x 256
    assert child.peak_rss_bytes > 100e6
    assert json.loads((tmp_path / "peer_child.json").read_text()) == result
