"""scripts/gpu_check.sh in its no-GPU mode (`--device cpu --tiny`): the steps a lent GPU
machine runs, minus the GPU, end to end: build a torch repository, serve it, class scaling
with perf_analyzer, served vs in process, the kernel profile, the hierarchy, the
results bundle."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _run(args: list[str], env: dict[str, str], timeout: float = 60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, DART_BENCH_CACHE=str(tmp_path / "cache"))
    e.pop("OUT", None)
    # the script runs this interpreter's environment (the project venv)
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    return e


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "--device must be cuda or cpu"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--compile", "fast"], "--compile must be"),
    (["--steps", "setup,frobnicate"], "unknown step frobnicate"),
])
def test_usage_errors_exit_2_in_one_line(env, tmp_path, args, message):
    res = _run([*args, "--out", str(tmp_path / "out")], env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"[gpu_check] error: {message}")


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_tiny_mode_runs_every_no_gpu_step(env, tmp_path):
    out, bundle = tmp_path / "out", tmp_path / "bundle.tgz"
    res = _run(["--device", "cpu", "--tiny", "--out", str(out), "--bundle", str(bundle)], env,
               timeout=850)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert summary.endswith(
        "setup=ok tools=ok test=ok build=ok serve=ok profile=ok hierarchy=ok paths=ok "
        "streams_build=ok streams=ok masks=ok bundle=ok")

    results = (out / "RESULTS.md").read_text()
    for key in ("gpu_check_cpu_tiny_ckpt", "class_scaling_gpu_check_cpu_tiny_ckpt",
                "kernel_profile_cpu_tiny_ckpt", "hierarchy_cpu_tiny_torch_backend",
                "request_path", "streams"):
        assert f"<!-- BEGIN {key} -->" in results and f"<!-- END {key} -->" in results
    check = results.split("<!-- BEGIN gpu_check_cpu_tiny_ckpt -->")[1].split("<!-- END")[0]
    assert "GPU-resident hand-offs: no: enc_dec got fpn_features" in check  # CPU: host memory
    assert check.count("n/a (goals are for 1008 px FP16 on a GPU)") == 4
    scaling = results.split("<!-- BEGIN class_scaling_gpu_check_cpu_tiny_ckpt -->")[1]
    assert "\n| 8 | 2 |" in scaling  # 8 classes: two enc_dec passes of at most 4
    # the study names what served it (read from the server), not the ORT repository
    assert "torch backend (CPU; fp32, compile none, no CUDA graphs)" in scaling
    # the committed results are never written by a CPU run
    assert "gpu_check_cpu" not in (ROOT / "benchmarks" / "RESULTS.md").read_text()

    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert "gpu_check/RESULTS.md" in names and "gpu_check/logs/serve.log" in names
    assert any(n.startswith("gpu_check/results/class_scaling_") for n in names)
    assert not any("repo-torch-" in n for n in names)  # repositories stay behind
