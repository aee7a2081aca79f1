"""`--backend torch`: the restructured PyTorch modules served from safetensors.

On the CPU (CI): a torch repository (FP32) on a real tritonserver returns the naive SAM3
reference's detections through `dart` and `dart_ensemble`; the build refuses GPU-only
options without a GPU; the weights round-trip exactly; `pb.from_torch` hands python_backend
the tensor object (so it synchronises streams). The GPU side is in tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import tests.fakes.pb_utils as fake_pb_utils
from dart_triton.client import DartClient
from dart_triton.contract import specs
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import NAMES, assert_same, assert_same_masks, raw_inputs


@pytest.fixture(scope="module")
def torch_server(torch_repository):
    from dart_triton.serving.server import TritonServer

    with TritonServer(torch_repository, startup_timeout=180,
                      extra_args=["--exit-timeout-secs=5"]) as server:
        yield server


def graph_inputs(server, model: str, name: str, memory: str) -> float:
    """`dart_graph_inputs_total` for one model input and memory kind."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith("dart_graph_inputs_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels == {"model": model, "input": name, "memory": memory}:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no dart_graph_inputs_total for {model}/{name}/{memory}")


# Served = naive reference ---------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("model", ["dart", "dart_ensemble"])
@pytest.mark.parametrize("n", [1, 3, TEST_MAX_CLASSES])
def test_torch_served_equals_naive_reference(torch_server, naive, photo, model, n):
    with DartClient(torch_server.grpc_url, model=model) as c:
        served = c.detect(photo, NAMES[:n])
    assert_same(served, naive.detect(photo, NAMES[:n]))


@pytest.mark.server
@pytest.mark.parametrize("n", [1, 3, 3 * TEST_MAX_CLASSES])
def test_torch_served_masks_equal_sam3s(torch_server, naive, photo, n):
    """The torch backend's mask_decoder (`test_masks.py` has the other backend/variant
    pairs)."""
    with DartClient(torch_server.grpc_url) as c:
        served = c.detect(photo, NAMES[:n], masks=True)
    assert_same_masks(served, naive.detect(photo, NAMES[:n], masks=True))


@pytest.mark.server
def test_torch_dart_chunks_three_times_max(torch_server, naive, photo):
    classes = NAMES[: 3 * TEST_MAX_CLASSES]
    with DartClient(torch_server.grpc_url) as c:
        served = c.detect(photo, classes)
    assert len(served) > 0
    assert_same(served, naive.detect(photo, classes))


@pytest.mark.server
def test_torch_ensemble_refuses_more_than_max(torch_server):
    c = grpcclient.InferenceServerClient(torch_server.grpc_url)
    names = [n.encode() for n in NAMES[: TEST_MAX_CLASSES + 1]]
    good = np.zeros((32, 48, 3), np.uint8)
    with pytest.raises(InferenceServerException, match=f"at most {TEST_MAX_CLASSES} classes"):
        c.infer(specs.DART_ENSEMBLE, raw_inputs(good, names), client_timeout=60)
    assert c.is_model_ready(specs.DART_ENSEMBLE)


@pytest.mark.server
def test_torch_enc_dec_refuses_more_prompts_than_max_and_keeps_serving(torch_server):
    """Called directly, enc_dec names its limit (INVALID_ARG) and stays ready."""
    from dart_triton.contract.specs import GraphDims
    from dart_triton.graphs.torch_graphs import example_inputs

    c = grpcclient.InferenceServerClient(torch_server.grpc_url)
    cfg = c.get_model_config(specs.ENC_DEC, as_json=True)["config"]
    dims = [int(d) for d in cfg["input"][0]["dims"]]
    d = GraphDims(fpn_dim=dims[1], text_len=int(cfg["input"][1]["dims"][1]),
                  text_dim=int(cfg["input"][1]["dims"][2]))
    inputs = []
    for spec_input, value in zip(specs.enc_dec_spec(d).inputs,
                                 example_inputs(specs.ENC_DEC, d, TEST_MAX_CLASSES + 1),
                                 strict=True):
        value = value.numpy()
        if spec_input.name == specs.FPN_FEATURES:
            value = np.zeros(dims, np.float32)
        t = grpcclient.InferInput(spec_input.name, list(value.shape), spec_input.triton_dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    with pytest.raises(InferenceServerException, match=f"1 to {TEST_MAX_CLASSES} prompts"):
        c.infer(specs.ENC_DEC, inputs, client_timeout=60)
    assert c.is_model_ready(specs.ENC_DEC)


@pytest.mark.server
def test_torch_graph_models_count_where_inputs_arrive(torch_server, photo):
    """On a CPU instance every input arrives in host memory; the counter is what the GPU
    test reads to prove the hand-offs stay on the device."""
    before = graph_inputs(torch_server, specs.ENC_DEC, specs.FPN_FEATURES, "cpu")
    with DartClient(torch_server.grpc_url) as c:
        c.detect(photo, NAMES[: TEST_MAX_CLASSES + 1])  # two enc_dec passes
    assert graph_inputs(torch_server, specs.ENC_DEC, specs.FPN_FEATURES, "cpu") == before + 2
    assert graph_inputs(torch_server, specs.ENC_DEC, specs.FPN_FEATURES, "gpu") == 0


@pytest.mark.server
def test_torch_config_carries_the_torch_settings(torch_server):
    c = httpclient.InferenceServerClient(torch_server.http_url)
    for model in specs.GRAPH_MODELS:
        cfg = c.get_model_config(model)
        params = {k: v["string_value"] for k, v in cfg["parameters"].items()}
        assert params["precision"] == "fp32" and params["compile"] == "none"
        assert params["cuda_graphs"] == "no"
        assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in params  # CPU build: host tensors
        assert cfg["backend"] == "python"
        assert cfg["instance_group"][0]["kind"] == "KIND_CPU"


# Build ----------------------------------------------------------------------------------


def test_torch_repository_holds_safetensors_not_pickles(torch_repository):
    from dart_triton.graphs.torch_graphs import WEIGHTS_DIR

    for model in specs.GRAPH_MODELS:
        files = sorted(p.name for p in (torch_repository / model / "1" / WEIGHTS_DIR).iterdir())
        assert files == ["dart_graph.json", "model.safetensors", "sam3_config.json"]
        assert not list((torch_repository / model / "1").glob("*.onnx"))
    manifest = json.loads((torch_repository / "dart_repository.json").read_text())
    assert manifest["backend"] == "torch"


def test_torch_modules_compute_what_they_were_built_from(torch_repository, parts):
    """The weights round-trip: the head's outputs are bit for bit the same; the backbone,
    whose attention runs as SDPA here, agrees to float rounding."""
    from dart_triton.graphs.torch_graphs import TorchGraphs

    graphs = TorchGraphs.from_repository(torch_repository)
    d = parts.dims
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, 3, d.imgsz, d.imgsz)).astype(np.float32)
    text = rng.standard_normal((3, d.text_len, d.text_dim)).astype(np.float32)
    mask = np.ones((3, d.text_len), np.int32)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref_feats = parts.backbone(torch.from_numpy(pixels))[0]
        ref_head = parts.runtime_head(ref_feats, torch.from_numpy(text), torch.from_numpy(mask))
    ref = ref_feats.numpy()  # ~300 in magnitude: rounding shows at ~1e-4
    np.testing.assert_allclose(graphs.backbone(pixels), ref, atol=1e-6 * np.abs(ref).max())
    served = graphs.enc_dec(ref_feats.numpy(), text, mask)
    assert len(served) == 5  # built with masks: the mask head's inputs too (`parts` has none)
    for got, ref in zip(served[:3], ref_head, strict=True):
        np.testing.assert_array_equal(got, ref.numpy())


def test_weights_of_one_model_are_refused_for_the_other(torch_repository):
    from dart_triton.graphs.torch_graphs import TorchGraphError, load_graph_module, weights_dir

    with pytest.raises(TorchGraphError, match="expected 'backbone'"):
        load_graph_module(weights_dir(torch_repository, specs.ENC_DEC), specs.BACKBONE)
    with pytest.raises(TorchGraphError, match="not a torch graph weights directory"):
        load_graph_module(torch_repository / "postprocess" / "1", specs.BACKBONE)


@pytest.mark.parametrize("args, message", [
    (["--precision", "fp16"], "fp16 needs a GPU"),
    (["--cuda-graphs"], "CUDA graphs need a GPU"),
    (["--compile", "fast"], "invalid choice"),
])
def test_build_refuses_gpu_only_torch_options_on_the_cpu(tiny_checkpoint, tmp_path, capsys,
                                                          args, message):
    from dart_triton.export.repository import main

    argv = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "repo"),
            "--backend", "torch", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1]
    assert not (tmp_path / "repo").exists()  # refused before any work


def test_gpu_build_config_keeps_tensors_on_the_gpu():
    """A --gpu torch build: KIND_GPU instances, FP16 by default, GPU inputs allowed."""
    from dart_triton.export.backends import check_build
    from dart_triton.export.options import BuildOptions
    from dart_triton.export.triton_config import all_configs

    build = BuildOptions(backend="torch", gpu=True, buckets=(1, 4, 16), compile="default",
                         cuda_graphs=True)
    configs = all_configs(check_build(build).repo_options(build, specs.GraphDims()))
    for model in specs.GRAPH_MODELS:
        text = configs[model]
        assert 'backend: "python"' in text and "kind: KIND_GPU" in text
        for key, value in (("precision", "fp16"), ("compile", "default"),
                           ("cuda_graphs", "yes"), ("enc_dec_buckets", "1,4,16"),
                           ("FORCE_CPU_ONLY_INPUT_TENSORS", "no")):
            assert f'key: "{key}"\n  value {{ string_value: "{value}" }}' in text
    explicit = BuildOptions(backend="torch", gpu=True, precision="fp32")
    assert check_build(explicit).repo_options(explicit, specs.GraphDims()).graph_settings[
        "precision"] == "fp32"


# pb.from_torch hands the tensor object over --------------------------------------------


class _DeviceTensor:
    """What `from_torch` sees of a CUDA tensor, backed by host memory: `is_cuda` and the
    DLPack protocol (the real thing is exercised by tests/gpu/test_gpu.py)."""

    is_cuda = True

    def __init__(self, value: torch.Tensor):
        self.value = value

    def contiguous(self) -> _DeviceTensor:
        return self

    def __dlpack__(self, stream=None):
        return self.value.__dlpack__()

    def __dlpack_device__(self):
        return self.value.__dlpack_device__()


def test_from_torch_gives_python_backend_the_tensor_not_a_capsule(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    from dart_triton.triton_models import pb

    monkeypatch.setattr(pb, "pb_utils", fake_pb_utils)
    fake_pb_utils.Tensor.dlpack_given.clear()
    value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    out = pb.from_torch(specs.FPN_FEATURES, _DeviceTensor(value))
    (name, given), = fake_pb_utils.Tensor.dlpack_given
    assert name == specs.FPN_FEATURES
    assert isinstance(given, _DeviceTensor)  # the object itself: its __dlpack__ gets a stream
    np.testing.assert_array_equal(out.as_numpy(), value.numpy())
    # CPU tensors go through numpy, not DLPack
    cpu = pb.from_torch(specs.TEXT_MASK, torch.ones(2, 4, dtype=torch.int32))
    assert cpu.as_numpy().dtype == np.int32 and len(fake_pb_utils.Tensor.dlpack_given) == 1


def test_enc_dec_with_cuda_graphs_runs_an_unpadded_n_at_the_next_warm_shape(torch_repository):
    """dart_ensemble passes N as it comes: a graphed enc_dec pads it to the next captured
    bucket (no compile mid-serving) and returns N rows, the ones eager computes."""
    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings, weights_dir

    path = weights_dir(torch_repository, specs.ENC_DEC)
    eager = TorchGraph.from_weights(path, specs.ENC_DEC)
    graphed = TorchGraph.from_weights(path, specs.ENC_DEC)
    graphed.settings = TorchSettings(cuda_graphs=True)  # the padding rule, on the CPU
    seen: list[int] = []

    def recording(*inputs):
        seen.append(int(inputs[1].shape[0]))
        return graphed.module(*inputs)

    graphed._fn = recording
    graphed._warm = [1, 4]  # what warm_up((1, 4)) records
    d = eager.dims
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, d.fpn_dim, d.feat_hw, d.feat_hw, generator=gen)
    for n, rows in ((3, 4), (1, 1), (2, 4), (4, 4)):
        text = torch.randn(n, d.text_len, d.text_dim, generator=gen)
        mask = torch.ones(n, d.text_len, dtype=torch.int32)
        mask[-1, d.text_len // 2:] = 0
        out = graphed(feats, text, mask)
        assert seen[-1] == rows
        for e, g in zip(eager(feats, text, mask), out, strict=True):
            assert g.shape[0] == n
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_a_shared_pass_with_cuda_graphs_runs_at_warm_frame_and_prompt_counts(torch_repository):
    """A shared pass (3 frames, 3 rows) on a graphed enc_dec: zero frames up to the next
    warm frame count (4), rows up to the next warm prompt count (4, the padded row in the
    last row's frame); the rows returned are the ones eager computes."""
    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings, weights_dir

    path = weights_dir(torch_repository, specs.ENC_DEC)
    eager = TorchGraph.from_weights(path, specs.ENC_DEC)
    graphed = TorchGraph.from_weights(path, specs.ENC_DEC)
    graphed.settings = TorchSettings(cuda_graphs=True)  # the padding rule, on the CPU
    seen: list[tuple[int, list[int]]] = []

    def recording(*inputs):
        seen.append((int(inputs[0].shape[0]), inputs[3].tolist()))
        return graphed.module(*inputs)

    graphed._fn, graphed._warm, graphed._frames = recording, [1, 4], [1, 2, 4]
    d = eager.dims
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(3, d.fpn_dim, d.feat_hw, d.feat_hw, generator=gen)
    text = torch.randn(3, d.text_len, d.text_dim, generator=gen)
    mask = torch.ones(3, d.text_len, dtype=torch.int32)
    index = torch.tensor([0, 1, 2])
    out = graphed(feats, text, mask, index)
    assert seen == [(4, [0, 1, 2, 2])]
    for e, g in zip(eager(feats, text, mask, index), out, strict=True):
        assert g.shape[0] == 3
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
