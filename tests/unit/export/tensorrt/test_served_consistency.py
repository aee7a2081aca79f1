"""One repository's four views of enc_dec's class-count axis must agree: the plan's
optimisation profiles (in order), the config's instance-group profile list, the buckets
`dart` pads to, and every CUDA `graph_spec` (which tensorrt_backend captures on the
context of every listed profile)."""

from __future__ import annotations

import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dart_triton.contract import specs
from dart_triton.contract.passes import parse_buckets, plan_passes
from dart_triton.export.tensorrt import build as tensorrt_build
from dart_triton.export.tensorrt import executor as plan_executor
from dart_triton.export.triton_config import RepoOptions, all_configs
from tests.fakes.tensorrt import FakeTensorRT, HostBuffers, read_plan
from tests.fakes.tiny_graphs import FAKE_GPU, TINY


def _within(shape, lo, hi) -> bool:
    return len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi,
                                                                       strict=True))


@pytest.mark.parametrize(("buckets", "max_classes"), [
    ((1, 4, 16), 16), ((2, 8), 8), ((16,), 16), ((), 16)])
def test_profiles_buckets_and_graph_specs_agree(monkeypatch, onnx_dir, tmp_path, buckets,
                                                max_classes):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.9.0.34"))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    repo = tmp_path / "repo"
    dims = specs.GraphDims(**{**TINY.__dict__, "max_classes": max_classes})
    # the repository builder's two halves: configs from RepoOptions, plans from the options
    configs = {name: text_format.Parse(text, mc.ModelConfig()) for name, text in all_configs(
        RepoOptions(backend="tensorrt", dims=dims, enc_dec_buckets=buckets)).items()}
    tensorrt_build.build_plans(onnx_dir, repo, {"buckets": buckets, "max_classes": max_classes,
                                                "skip_verify": True})
    plans = {m: read_plan((repo / m / "1" / "model.plan").read_bytes())[0]
             for m in specs.GRAPH_MODELS}

    for model in specs.GRAPH_MODELS:
        cfg, plan = configs[model], plans[model]
        inputs = {name: (shape, shape) for name, shape, _ in
                  ((n, tuple(s), d) for n, s, d in plan["inputs"])}  # static: min = max
        profiles = [{n: (tuple(lo), tuple(hi)) for n, (lo, _opt, hi) in p.items()}
                    for p in plan["profiles"]] or [{}]
        profiles = [{**inputs, **p} for p in profiles]
        # the config's profile list names the plan's profiles, in the plan's order
        listed = [int(p) for g in cfg.instance_group for p in g.profile] or [0]
        assert listed == list(range(len(profiles))), model
        # every graph_spec is a shape each listed profile accepts (no setInputShape errors)
        for spec in cfg.optimization.cuda.graph_spec:
            assert spec.batch_size == 0
            for i in listed:
                for name, value in spec.input.items():
                    lo, hi = profiles[i][name]
                    assert _within(tuple(value.dim), lo, hi), (model, i, name, value.dim)
        if model == specs.BACKBONE:
            assert len(cfg.optimization.cuda.graph_spec) == 1  # static: always captured
            continue
        # dart pads every pass to a size exactly one profile takes, tuned for that size
        dart_buckets = parse_buckets(configs[specs.DART].parameters["enc_dec_buckets"]
                                     .string_value)
        assert dart_buckets == tuple(buckets)
        opts = [tuple(p[specs.TEXT_FEATURES][1]) for p in plan["profiles"]]
        for n in range(1, 3 * max_classes + 2):
            for p in plan_passes(n, max_classes, dart_buckets):
                rows = (p.rows, dims.text_len, dims.text_dim)
                holders = [i for i, prof in enumerate(profiles)
                           if _within(rows, *prof[specs.TEXT_FEATURES])]
                assert len(holders) == 1, (n, p, holders)
                if dart_buckets:
                    assert opts[holders[0]] == rows  # tuned at the padded size
        captured = [s.input[specs.TEXT_FEATURES].dim[0]
                    for s in cfg.optimization.cuda.graph_spec]
        assert captured == (list(buckets) if len(buckets) == 1 else [])


@pytest.mark.parametrize("buckets", [(1, 4, 16), ()])
def test_mask_decoder_config_matches_its_plan(monkeypatch, tmp_path, buckets):
    """A --masks repository: every graph model's config declares the tensors its plan has
    (the plan's dynamic dimensions -1), and mask_decoder's one profile takes every call
    `dart` makes (P up to max_classes prompts, J up to every query), with no profile list
    and no CUDA graph in its config."""
    from tests.fakes.tiny_graphs import tiny_mask_graphs

    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT("10.9.0.34"))
    monkeypatch.setattr(plan_executor, "TorchCudaBuffers", HostBuffers)
    monkeypatch.setattr(tensorrt_build, "current_device", lambda: dict(FAKE_GPU))
    onnx_dir, repo = tiny_mask_graphs(tmp_path / "onnx"), tmp_path / "repo"
    dims = specs.GraphDims(**{**TINY.__dict__, "masks": True})
    configs = {name: text_format.Parse(text, mc.ModelConfig()) for name, text in all_configs(
        RepoOptions(backend="tensorrt", dims=dims, enc_dec_buckets=buckets)).items()}
    tensorrt_build.build_plans(onnx_dir, repo, {"buckets": buckets, "skip_verify": True})
    for model in specs.MASK_GRAPH_MODELS:
        plan = read_plan((repo / model / "1" / "model.plan").read_bytes())[0]
        cfg = configs[model]
        for declared, built in ((cfg.input, plan["inputs"]), (cfg.output, plan["outputs"])):
            assert {t.name: list(t.dims) for t in declared} == {
                n: list(s) for n, s, _ in built}, model
    cfg = configs[specs.MASK_DECODER]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
    assert not [p for g in cfg.instance_group for p in g.profile]  # profile 0, the only one
    assert not cfg.optimization.cuda.graph_spec and not cfg.optimization.cuda.graphs
    plan = read_plan((repo / specs.MASK_DECODER / "1" / "model.plan").read_bytes())[0]
    (profile,) = plan["profiles"]
    static = {n: (tuple(s), tuple(s)) for n, s, _ in plan["inputs"] if -1 not in s}
    ranges = {**static, **{n: (tuple(lo), tuple(hi)) for n, (lo, _opt, hi) in profile.items()}}
    spec = specs.mask_decoder_spec(dims)
    for p in (1, 2, dims.max_classes):
        for j in (1, 3, dims.num_queries):
            for t in spec.inputs:
                values = iter((p, j))
                shape = tuple(next(values) if d == -1 else d for d in t.dims)
                assert _within(shape, *ranges[t.name]), (p, j, t.name, shape)
