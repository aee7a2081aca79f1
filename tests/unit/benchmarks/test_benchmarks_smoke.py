"""Every benchmark entry point runs end to end on the tiny random SAM3 and writes its
CSV, PNG and markdown section (into tmp_path; speed is not checked here)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture
def bench_env(tmp_path, monkeypatch, tiny_checkpoint):
    """Caches (ONNX graphs) and results under tmp_path; the shared tiny checkpoint."""
    monkeypatch.setenv("DART_BENCH_CACHE", str(tmp_path / "cache"))
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    common = ["--config", "tiny", "--iters", "1", "--warmup", "0", "--checkpoint",
              str(tiny_checkpoint), "--out", str(out), "--results", str(results)]
    return out, results, common


def _check(out, results, stem: str, key: str | None = None) -> str:
    assert (out / f"{stem}.csv").stat().st_size > 0
    assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    text = results.read_text()
    key = key or stem
    assert f"<!-- BEGIN {key} -->" in text and f"<!-- END {key} -->" in text
    section = text.split(f"<!-- BEGIN {key} -->")[1].split(f"<!-- END {key} -->")[0]
    assert "- machine:" in section and "- command:" in section and "|---" in section
    return section


def test_text_cache(bench_env):
    from dart_triton.benchmarks import text_cache

    out, results, args = bench_env
    assert text_cache.main([*args, "--classes", "8"]) == 0
    assert "warm (all hit)" in _check(out, results, "text_cache")


def test_hierarchy_in_process(bench_env):
    from dart_triton.benchmarks import hierarchy

    out, results, args = bench_env
    assert hierarchy.main([*args, "--classes", "3", "5", "--max-classes", "2",
                           "--naive-max", "2"]) == 0
    section = _check(out, results, "hierarchy")
    assert "ONNX Runtime CPU" in section and "extrapolated" in section and "ceiling" in section


def test_enc_dec_tuning(bench_env):
    from dart_triton.benchmarks import enc_dec_tuning

    out, results, args = bench_env
    assert enc_dec_tuning.main([*args, "--classes", "1", "2", "--threads", "1",
                                "--ort-levels", "all"]) == 0
    assert "ONNX Runtime" in _check(out, results, "enc_dec_tuning")


def test_enc_dec_profile(bench_env):
    from dart_triton.benchmarks import enc_dec_profile

    out, results, args = bench_env
    assert enc_dec_profile.main([*args, "--classes", "2"]) == 0
    section = _check(out, results, "enc_dec_profile")
    assert "MatMul" in section and "aten::" in section


def test_fp16_precision_cpu(bench_env):
    from dart_triton.benchmarks import fp16_precision

    out, results, args = bench_env
    assert fp16_precision.main([*args, "--runtimes", "eager", "ort"]) == 0
    section = _check(out, results, "fp16_precision")
    assert "restructured" in section and "skipped" in section  # no CUDA EP on CPU


def test_masks(bench_env):
    from dart_triton.benchmarks import masks

    out, results, args = bench_env
    assert masks.main([*args, "--classes", "2", "--prompts", "1", "2", "--queries", "1", "3",
                       "--rle-size", "120", "160", "--request-iters", "1"]) == 0
    section = _check(out, results, "masks")
    assert "per kept class" in section and "per kept detection" in section
    assert "built with masks, masks asked" in section and "**measured at 112 px**" in section
    rows = [r for r in (out / "masks.csv").read_text().splitlines() if r.startswith("requests,")]
    assert len(rows) == 3 and all("measured at 112 px" in r for r in rows)


def test_masks_derives_from_the_recorded_gpu_figure(tmp_path):
    """--config full without a GPU derives the request latency: RESULTS.md's no-mask
    `dart` figure (1000 / seq_fps) plus the typical mask cost."""
    import argparse

    from dart_triton.benchmarks import masks

    args = argparse.Namespace(no_mask_ms=None, results=tmp_path / "none.md")
    found, source = masks.recorded_baselines(args, "cuda")
    if not found:
        pytest.skip("no recorded GPU class-scaling section (not a source checkout)")
    assert {4, 16} <= set(found) and min(found.values()) > 0 and "seq_fps" in source
    rows = masks.derived_requests([4], 10.0, found, source)
    assert rows[1]["ms"] == pytest.approx(found[4] + 10.0) and "derived" in rows[1]["how"]
    args.no_mask_ms = ["4=100"]
    assert masks.recorded_baselines(args, "cpu")[0] == {4: 100.0}


def test_perf_input(tmp_path):
    from dart_triton.benchmarks import perf_input

    path = tmp_path / "input.json"
    assert perf_input.main(["--num-classes", "3", "--output", str(path)]) == 0
    entry = json.loads(path.read_text())["data"][0]
    assert entry["CLASSES"]["content"] == ["person", "bicycle", "car"]
    assert entry["IMAGE"]["shape"][2] == 3


@pytest.mark.server
@pytest.mark.slow
def test_served_benchmarks(bench_env, triton_server):
    """hierarchy L4, serving overhead and class scaling against the shared tiny server."""
    from dart_triton.benchmarks import class_scaling, hierarchy, serving_overhead

    out, results, args = bench_env
    urls = ["--url", triton_server.grpc_url, "--http-url", triton_server.http_url]
    assert hierarchy.main([*args, "--classes", "3", "--url", triton_server.grpc_url,
                           "--stem", "hierarchy_served"]) == 0
    assert "Triton" in _check(out, results, "hierarchy_served")

    assert serving_overhead.main([*args, *urls, "--classes", "2", "6"]) == 0
    section = _check(out, results, "serving_overhead")
    assert "dart_ensemble" in section and "in-process" in section

    try:
        from dart_triton.benchmarks.perf_analyzer import find_perf_analyzer

        find_perf_analyzer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert class_scaling.main([*args, *urls, "--classes", "1", "6"]) == 0
    section = _check(out, results, "class_scaling")
    assert "backbone" in section and "enc_dec" in section


def test_batch_gain_packs_passes_as_served(bench_env):
    """The in-process bound of batching: F frames per backbone call, shared enc_dec passes
    of at most max-classes rows holding whole frames (2 classes, 4 frames, max 4: 2 passes)."""
    import csv

    from dart_triton.benchmarks import batch_gain

    out, results, args = bench_env
    assert batch_gain.main([*args, "--frames", "1", "2", "4", "--classes", "1", "2",
                            "--max-classes", "4"]) == 0
    with open(out / "batch_gain.csv") as f:
        rows = {(int(r["frames"]), int(r["n"])): r for r in csv.DictReader(f)}
    assert set(rows) == {(f, n) for f in (1, 2, 4) for n in (1, 2)}
    assert [int(rows[f, 2]["passes"]) for f in (1, 2, 4)] == [1, 1, 2]
    assert [int(rows[f, 1]["passes"]) for f in (1, 2, 4)] == [1, 1, 1]
    for (f, _), r in rows.items():
        total = float(r["backbone_ms"]) + float(r["enc_dec_ms"])
        assert float(r["ms_per_frame"]) == pytest.approx(total / f)
    assert rows[1, 1]["bound_vs_alone"] == "1.00x"
    section = results.read_text().split("<!-- BEGIN batch_gain -->")[1]
    assert "- command:" in section and "| frames |" in section
