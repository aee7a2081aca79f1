"""Every config.pbtxt against the one source of truth (dart_triton.contract.specs)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dart_triton.contract import specs
from dart_triton.export.backends import BACKENDS
from dart_triton.export.triton_config import (
    RepoOptions,
    all_configs,
    python_model_entry,
    reference_options,
)
from tests.helpers import REPO_ROOT

SOURCE_REPOSITORY = REPO_ROOT / "model_repository"

DIMS = specs.GraphDims(imgsz=644, max_classes=8)


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def check_against_spec(cfg: mc.ModelConfig, spec: specs.ModelSpec) -> None:
    assert cfg.name == spec.name and cfg.max_batch_size == 0
    for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
        assert [t.name for t in got] == [t.name for t in want]
        for g, w in zip(got, want, strict=True):
            assert mc.DataType.Name(g.data_type) == w.dtype, g.name
            assert tuple(g.dims) == w.dims, g.name
    for g, w in zip(cfg.input, spec.inputs, strict=True):
        assert g.optional == w.optional, g.name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("masks", [False, True])
def test_generated_configs_match_specs(backend, gpu, masks):
    dims = specs.GraphDims(imgsz=644, max_classes=8, masks=masks)
    opts = RepoOptions(backend=backend, dims=dims, gpu=gpu,
                       enc_dec_buckets=(1, 4, 8) if backend == "tensorrt" else ())
    configs = {name: parse(text) for name, text in all_configs(opts).items()}
    all_specs = specs.all_specs(dims)
    assert set(configs) == set(all_specs)
    assert (specs.MASK_DECODER in configs) == masks
    for name, cfg in configs.items():
        check_against_spec(cfg, all_specs[name])
    dart = {k: v.string_value for k, v in configs[specs.DART].parameters.items()}
    assert dart["masks"] == ("yes" if masks else "no")
    if masks:  # the backbone outputs dart hands mask_decoder, by name
        assert dart["mask_levels"].split(",") == [
            t.name for t in all_specs[specs.MASK_DECODER].inputs[:len(dims.mask_levels)]]
        assert set(dart["mask_levels"].split(",")) <= {
            t.name for t in all_specs[specs.BACKBONE].outputs}


def test_committed_reference_configs_are_generated():
    """model_repository/*/config.pbtxt == generator output (regenerate with
    `python -m dart_triton.export.triton_config`)."""
    for name, text in all_configs(reference_options()).items():
        assert (SOURCE_REPOSITORY / name / "config.pbtxt").read_text() == text, name
        check_against_spec(parse(text), specs.all_specs(reference_options().dims)[name])
    backend = BACKENDS[reference_options().backend]
    entries = {p.parent.parent.name: p.read_text()
               for p in SOURCE_REPOSITORY.glob("*/1/model.py")}
    assert entries == {name: python_model_entry(module)
                       for name, module in backend.python_models().items()}


def test_tensorrt_specifics():
    opts = RepoOptions(backend="tensorrt", dims=DIMS, enc_dec_buckets=(1, 4, 8))
    cfgs = {k: parse(v) for k, v in all_configs(opts).items()}
    for name in ("backbone", "enc_dec"):
        assert cfgs[name].platform == "tensorrt_plan"
        assert cfgs[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfgs["backbone"].optimization.cuda.graphs
    assert list(cfgs["enc_dec"].instance_group[0].profile) == ["0", "1", "2"]
    # CUDA graphs only for shapes every profile takes
    # (tests/unit/export/tensorrt/test_served_consistency.py)
    assert not cfgs["enc_dec"].optimization.cuda.graphs
    for name in ("preprocess", "text_encoder", "postprocess", "dart"):
        params = cfgs[name].parameters
        assert params["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert cfgs["dart"].parameters["enc_dec_buckets"].string_value == "1,4,8"


def test_onnxruntime_specifics():
    cfgs = {k: parse(v) for k, v in all_configs(RepoOptions("onnxruntime", DIMS)).items()}
    assert cfgs["backbone"].platform == "onnxruntime_onnx"
    assert cfgs["enc_dec"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_batch_batches_the_backbone_and_shares_passes_where_it_can(backend):
    """--max-batch B: the backbone's leading 1 becomes Triton's batch dimension (so the
    one-frame requests of dart and the ensemble batch), with the dynamic batcher's delay,
    on every backend. Where enc_dec can pack requests of different prompt counts (python,
    torch), it is batched too, a request (a frame and its rows) per item, its prompt
    inputs ragged; text_encoder and postprocess declare the rows as that one item
    (reshaped to what they compute), and dart knows. Nothing else changes."""
    from dart_triton.export.backends import check_build
    from dart_triton.export.options import BuildOptions

    shared = BACKENDS[backend].shares_passes
    opts = BACKENDS[backend].repo_options(BuildOptions(backend=backend, max_batch=4), DIMS)
    assert opts.shared_passes == shared
    check_build(BuildOptions(backend=backend, max_batch=4))  # no backend refuses it
    plain = all_configs(RepoOptions(backend=backend, dims=DIMS))
    batched = all_configs(RepoOptions(backend=backend, dims=DIMS, max_batch=4,
                                      batch_delay_us=250, shared_passes=shared))
    changed = {specs.BACKBONE} | ({specs.ENC_DEC, specs.TEXT_ENCODER, specs.POSTPROCESS,
                                   specs.DART} if shared else set())
    assert {k for k in plain if plain[k] != batched[k]} == changed
    cfg, spec = parse(batched[specs.BACKBONE]), specs.backbone_spec(DIMS)
    assert cfg.max_batch_size == 4
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
        assert [(t.name, (1, *t.dims)) for t in got] == [(t.name, t.dims) for t in want]
    with pytest.raises(ValueError, match="--max-batch must be >= 1"):
        BuildOptions(max_batch=0)
    if not shared:
        return
    cfg, graph = parse(batched[specs.ENC_DEC]), specs.enc_dec_spec(DIMS)
    assert cfg.max_batch_size == 4
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert [(t.name, tuple(t.dims), t.allow_ragged_batch) for t in cfg.input] == [
        (specs.FPN_FEATURES, graph.inputs[0].dims[1:], False),
        *((t.name, t.dims, True) for t in graph.inputs[1:])]
    assert [(t.name, tuple(t.dims)) for t in cfg.output] == [(t.name, t.dims)
                                                             for t in graph.outputs]
    text = parse(batched[specs.TEXT_ENCODER])
    post = parse(batched[specs.POSTPROCESS])
    for t in (*text.output, *post.input[:len(specs.HEAD_OUTPUTS)]):
        assert t.dims[0] == 1 and tuple(t.reshape.shape) == tuple(t.dims[1:]), t.name
    dart = {k: v.string_value for k, v in parse(batched[specs.DART]).parameters.items()}
    assert (dart["shared_passes"], dart["passes_in_flight"]) == ("yes", "4")


@pytest.mark.parametrize(("max_batch", "graphs"), [
    (4, [(1, None), (2, None), (4, 3)]), (6, [(1, None), (2, None), (4, 3), (6, 5)]),
    (2, [(1, None), (2, None)])])
def test_tensorrt_batched_backbone_cuda_graphs_per_frame_bucket(max_batch, graphs):
    """A batched TensorRT backbone captures one CUDA graph per frame bucket, at its batch
    size (1..max_batch_size, as Triton requires with max_batch_size > 0) with the input
    shape less the batch dimension, each also serving the sizes down to the previous
    bucket (graph_lower_bound); unbatched, the one graph at batch_size 0."""
    opts = RepoOptions(backend="tensorrt", dims=DIMS, max_batch=max_batch)
    cuda = parse(all_configs(opts)[specs.BACKBONE]).optimization.cuda
    assert cuda.graphs
    frame = (3, DIMS.imgsz, DIMS.imgsz)
    got = []
    for g in cuda.graph_spec:
        assert tuple(g.input[specs.PIXEL_VALUES].dim) == frame
        low = g.graph_lower_bound.batch_size if g.HasField("graph_lower_bound") else None
        if low is not None:
            assert tuple(g.graph_lower_bound.input[specs.PIXEL_VALUES].dim) == frame
        got.append((g.batch_size, low))
    assert got == graphs
    plain = parse(all_configs(RepoOptions(backend="tensorrt", dims=DIMS))[specs.BACKBONE])
    (g,) = plain.optimization.cuda.graph_spec
    assert g.batch_size == 0 and tuple(g.input[specs.PIXEL_VALUES].dim) == (1, *frame)


def test_ensemble_wiring():
    cfg = parse(all_configs(RepoOptions(dims=DIMS))["dart_ensemble"])
    all_specs = specs.all_specs(DIMS)
    available = {t.name for t in all_specs["dart_ensemble"].inputs}
    for step in cfg.ensemble_scheduling.step:
        spec = all_specs[step.model_name]
        assert set(step.input_map) <= {t.name for t in spec.inputs}
        assert {t.name for t in spec.inputs if not t.optional} <= set(step.input_map)
        assert set(step.input_map.values()) <= available, step.model_name
        assert set(step.output_map) == {t.name for t in spec.outputs}
        available |= set(step.output_map.values())
    assert {t.name for t in all_specs["dart_ensemble"].outputs} <= available


def test_instances_are_build_parameters(tiny_checkpoint, tmp_path):
    from dart_triton.export.options import parse_instances
    from dart_triton.export.repository import build_repository

    with pytest.raises(ValueError, match="MODEL=COUNT"):
        parse_instances("dart=zero")
    build_repository(tiny_checkpoint, tmp_path / "py", backend="python", max_classes=2,
                     ort_threads=1, log=lambda *_: None)
    cfg = parse((tmp_path / "py" / "enc_dec" / "config.pbtxt").read_text())
    assert cfg.parameters["ort_threads"].string_value == "1"
    build_repository(tiny_checkpoint, tmp_path, backend="onnxruntime", max_classes=2,
                     instances=parse_instances("dart=3,enc_dec=2"), log=lambda *_: None)
    assert parse((tmp_path / "dart" / "config.pbtxt").read_text()).instance_group[0].count == 3
    assert parse((tmp_path / "enc_dec" / "config.pbtxt").read_text()).instance_group[0].count == 2
    assert (tmp_path / "enc_dec" / "1" / "model.onnx").is_file()
    assert not (tmp_path / "enc_dec" / "1" / "model.py").exists()  # the onnxruntime backend


@pytest.mark.server
def test_bundled_server_accepts_tensorrt_repository_configs(tiny_checkpoint, tmp_path):
    """The bundled Triton has no TensorRT backend; it still parses and validates every
    config: the python models load, and the plan models fail only for want of plans
    and the backend, never over their configuration."""
    import tritonclient.http as httpclient

    from dart_triton.export.repository import build_repository
    from dart_triton.serving.server import TritonServer

    build_repository(tiny_checkpoint, tmp_path, backend="tensorrt", max_classes=4,
                     buckets=(1, 4), build_plans=False, log=lambda *_: None)
    with TritonServer(tmp_path, extra_args=["--exit-on-error=false", "--strict-readiness=false",
                                            "--exit-timeout-secs=5"],
                      env={"HF_HUB_OFFLINE": "1"}) as server:
        index = {m["name"]: m for m in
                 httpclient.InferenceServerClient(server.http_url).get_model_repository_index()}
    # Triton got past parsing and validating every config (names, types, dims, ensemble
    # wiring, CUDA-graph specs): what stops each model here is only the missing GPU or
    # TensorRT backend, which the NGC container has.
    assert set(index) == set(specs.all_specs(DIMS))
    for name, entry in index.items():
        assert entry.get("state") != "READY"
        if name == "dart_ensemble":
            continue  # never attempted: its steps are unavailable
        reason = entry["reason"].lower()
        assert "no gpus are available" in reason or "backend 'tensorrt'" in reason, (name, reason)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instances_spread_over_listed_gpus(backend):
    """--gpus 0,1: every model's --instances count is per listed GPU (Triton's `gpus`)."""
    from dart_triton.export.options import parse_gpus, parse_instances

    opts = RepoOptions(backend=backend, dims=DIMS, gpus=parse_gpus("0,1"),
                       instances=parse_instances("dart=2,backbone=1,enc_dec=3"))
    cfgs = {k: parse(v) for k, v in all_configs(opts).items() if k != "dart_ensemble"}
    for name, cfg in cfgs.items():
        (group,) = cfg.instance_group
        assert group.kind == mc.ModelInstanceGroup.KIND_GPU, name
        assert list(group.gpus) == [0, 1], name
        assert group.count == opts.instances[name], name
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("0,0")
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("gpu0")


def test_serve_sizes_the_cuda_pool_for_the_gpus_a_repository_uses(tmp_path):
    """serve passes --cuda-memory-pool-byte-size for every GPU the configs place models on."""
    from dart_triton.export.triton_config import write_repository_files
    from dart_triton.serving.preflight import gpu_ids

    write_repository_files(tmp_path / "cpu", RepoOptions("python", DIMS))
    write_repository_files(tmp_path / "two", RepoOptions("python", DIMS, gpus=(0, 1)))
    write_repository_files(tmp_path / "trt", RepoOptions("tensorrt", DIMS))
    assert gpu_ids([tmp_path / "cpu"]) == set()
    assert gpu_ids([tmp_path / "two"]) == {0, 1}
    assert gpu_ids([tmp_path / "trt"]) == {0}
