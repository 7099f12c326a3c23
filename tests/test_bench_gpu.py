"""bench/gpu.py --quick: the GPU bench's CPU smoke run, in a process of its own that must not import Ray,
datasets or s3fs (the GPU machines have none of them)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # a subprocess: ~15 s


def test_quick_run_writes_its_table_without_ray_datasets_or_s3fs(tmp_path):
    code = ("import runpy, sys; "
            "sys.argv = ['gpu.py', '--quick', '--micro-batch-tokens', '4096', '--out', sys.argv[1]]; "
            "runpy.run_path('bench/gpu.py', run_name='__main__'); "
            "bad = [m for m in ('ray', 'datasets', 's3fs') if m in sys.modules]; "
            "assert not bad, f'bench/gpu.py imported {bad}'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    profiled = [r for r in result["rows"] if r["section"] == "profile"]
    rows = [r for r in result["rows"] if r["section"] != "profile"]
    assert {r["section"] for r in rows} == {"scoring", "long pairs", "training"}
    # the profile: shares of the ops' time by kind, adding up to the whole; matmuls among them
    assert abs(sum(r["share"] for r in profiled) - 1) < 1e-6 and any(r["what"] == "matmul" for r in profiled)
    assert (tmp_path / "profile.md").read_text().startswith("profile: 1 warm steps")
    whats = [r["what"] for r in rows if r["section"] == "scoring" and r["data"] == "hh"]
    assert any("attention flex (flex)" in w for w in whats) and any("attention varlen (varlen)" in w for w in whats)
    assert any(w.startswith("TRL-shaped") for w in whats)
    assert all(r["tokens_per_s"] > 0 and r["seconds"] > 0 for r in rows)
    training = [r["what"] for r in rows if r["section"] == "training"]
    labels = {w.split(";")[0].split(" (")[0] for w in training}
    assert labels == {"precomputed references", "reference beside the policy"}
    assert all(w.endswith("attention auto (dense)") for w in training)  # CPU: auto trains on the dense path
    table = (tmp_path / "gpu.md").read_text()
    assert table.startswith("bench/gpu.py on CPU") and table.count("\n| ") == len(rows) + 1


def test_a_failed_measurement_is_a_row_and_the_rest_still_runs(tmp_path, monkeypatch):
    """One GPU run is scarce: a path that fails (here the TRL-shaped pass, and training as a whole) leaves a
    FAILED row naming the error, and every other measurement is still taken and written."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def boom(*a, **kw):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")

    monkeypatch.setattr(bench, "trl_shaped", boom)
    monkeypatch.setattr(bench, "training", boom)
    result = bench.main(["--quick", "--out", str(tmp_path)])
    failed = [(r["section"], r["data"], r["what"]) for r in result["rows"] if "FAILED" in r["what"]]
    trl = "TRL-shaped (8 pairs a batch, padded, float32 log-softmax): FAILED RuntimeError: CUDA out of memory."
    assert failed == [("scoring", "hh", trl), ("scoring", "orca", trl),
                      ("training", "orca", "set-up: FAILED RuntimeError: CUDA out of memory.")]
    measured = [r for r in result["rows"] if "FAILED" not in r["what"]]
    assert {r["section"] for r in measured} == {"scoring", "long pairs"} and all(r["seconds"] > 0 for r in measured)
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert "FAILED RuntimeError" in (tmp_path / "gpu.md").read_text()


def test_the_profiles_gpu_time_is_counted_once():
    """On CUDA torch.profiler lists each kernel twice (as a CUDA row, and in the self device time of the CPU op
    that launched it) and annotated regions on top: the kernels' rows are the whole, CPU ops get what they
    launched, and the kernels no op launched (a compiled graph's) are a row of their own."""
    import importlib.util
    from types import SimpleNamespace as E

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cpu, cuda = "DeviceType.CPU", "DeviceType.CUDA"
    events = [E(key="aten::mm", device_type=cpu, is_user_annotation=False, self_device_time_total=60.0,
                self_cpu_time_total=5.0),
              E(key="aten::copy_", device_type=cpu, is_user_annotation=False, self_device_time_total=20.0,
                self_cpu_time_total=3.0),
              E(key="aten::linear", device_type=cpu, is_user_annotation=False, self_device_time_total=0.0,
                self_cpu_time_total=1.0),
              E(key="## Call CompiledFxGraph", device_type=cpu, is_user_annotation=True,
                self_device_time_total=15.0, self_cpu_time_total=2.0),
              E(key="Optimizer.step#AdamW.step", device_type=cuda, is_user_annotation=True,
                self_device_time_total=40.0, self_cpu_time_total=0.0),
              E(key="nvjet_gemm", device_type=cuda, is_user_annotation=False, self_device_time_total=60.0,
                self_cpu_time_total=0.0),
              E(key="direct_copy_kernel", device_type=cuda, is_user_annotation=False, self_device_time_total=20.0,
                self_cpu_time_total=0.0),
              E(key="triton_poi_fused_mul", device_type=cuda, is_user_annotation=False,
                self_device_time_total=15.0, self_cpu_time_total=0.0)]
    assert bench.op_times(events, "cuda") == {"aten::mm": 60.0, "aten::copy_": 20.0, bench.UNLAUNCHED: 15.0}
    assert sum(bench.op_times(events, "cpu").values()) == 11.0  # CPU: the ops' own CPU time
