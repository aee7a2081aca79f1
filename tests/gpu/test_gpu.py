"""GPU checks that need CUDA but not TensorRT (they run on a lent GPU; skip elsewhere)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dart_triton.export.onnx_export import cosine
from dart_triton.model.preprocess import preprocess_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]


def test_preprocess_on_gpu_matches_cpu(photo):
    cpu = preprocess_tensor(torch.from_numpy(photo), 1008)
    gpu = preprocess_tensor(torch.from_numpy(photo).cuda(), 1008)
    assert gpu.is_cuda
    # one 8-bit rounding step apart at most
    assert (gpu.cpu() - cpu).abs().max().item() <= 2 / 255 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_restructured_backbone_on_gpu(parts, dtype):
    size = parts.dims.imgsz
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = parts.backbone(x)[0].numpy()
        # a copy: casting the shared module would round the session's weights
        backbone = copy.deepcopy(parts.backbone).cuda().to(dtype)
        gpu = backbone(x.cuda().to(dtype))[0].float().cpu().numpy()
    assert cosine(gpu, ref) >= (0.99999 if dtype == torch.float32 else 0.999)


def test_batched_head_on_gpu(parts):
    d = parts.dims
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.standard_normal((1, d.fpn_dim, d.feat_hw, d.feat_hw),
                                                 np.float32))
    text = torch.from_numpy(rng.standard_normal((3, d.text_len, d.text_dim), np.float32))
    mask = torch.ones(3, d.text_len, dtype=torch.int32)
    with torch.no_grad():
        ref = parts.head(feats, text, mask)
        gpu = copy.deepcopy(parts.head).cuda()(feats.cuda(), text.cuda(), mask.cuda())
    for r, g in zip(ref, gpu, strict=True):
        assert (r - g.cpu()).abs().max().item() <= 1e-3


# The torch backend on the GPU (tests/unit/graphs/test_torch_graphs.py covers the CPU) -------------


@pytest.fixture(scope="module")
def torch_gpu_repository(tiny_checkpoint, tmp_path_factory):
    """--backend torch --gpu in FP32 (parity), CUDA graphs for the buckets 1 and 4, masks."""
    from dart_triton.export.repository import build_repository
    from tests.conftest import TEST_MAX_CLASSES

    repo = tmp_path_factory.mktemp("repo_torch_gpu")
    build_repository(tiny_checkpoint, repo, backend="torch", gpu=True, precision="fp32",
                     max_classes=TEST_MAX_CLASSES, buckets=(1, TEST_MAX_CLASSES),
                     cuda_graphs=True, masks=True, log=lambda *_: None)
    return repo


def test_from_torch_hands_the_cuda_tensor_itself(monkeypatch):
    """python_backend synchronises its stream with the producer's only when it gets an
    object with __dlpack__ (it calls it with its stream), not a bare capsule."""
    import sys

    import tests.fakes.pb_utils as fake_pb_utils

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    from dart_triton.triton_models import pb

    monkeypatch.setattr(pb, "pb_utils", fake_pb_utils)
    fake_pb_utils.Tensor.dlpack_given.clear()
    value = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4) * 2
    pb.from_torch("x", value)
    (_, given), = fake_pb_utils.Tensor.dlpack_given
    assert isinstance(given, torch.Tensor) and given.is_cuda
    assert torch.equal(given, value)


def test_torch_graphs_fp16_on_gpu_match_fp32_on_cpu(torch_gpu_repository):
    from dart_triton.graphs.torch_graphs import TorchGraphs, TorchSettings

    cpu = TorchGraphs.from_repository(torch_gpu_repository)
    gpu = TorchGraphs.from_repository(torch_gpu_repository, "cuda",
                                      TorchSettings(precision="fp16"))
    d = cpu.dims
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (1, 3, d.imgsz, d.imgsz)).astype(np.float32)
    text = rng.standard_normal((3, d.text_len, d.text_dim)).astype(np.float32)
    mask = np.ones((3, d.text_len), np.int32)
    feats_cpu, feats_gpu = cpu.backbone(pixels), gpu.backbone(pixels)
    assert feats_gpu.dtype == np.float32
    assert cosine(feats_gpu, feats_cpu) >= 0.999
    # FP16 through the 6+6 encoder-decoder layers of random tiny weights: one output gave
    # 0.9986 on an H200 (a few queries drift by ~0.06), so the head gets 0.995.
    for g, c in zip(gpu.enc_dec(feats_cpu, text, mask), cpu.enc_dec(feats_cpu, text, mask),
                    strict=True):
        assert cosine(g, c) >= 0.995


def test_cuda_graphs_replay_what_eager_computes(torch_gpu_repository):
    """Captured buckets (1, 4) and an uncaptured N (3) give eager's outputs."""
    from dart_triton.contract import specs
    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings, weights_dir

    eager = TorchGraph.from_weights(weights_dir(torch_gpu_repository, specs.ENC_DEC),
                                    specs.ENC_DEC, "cuda")
    graphed = TorchGraph.from_weights(weights_dir(torch_gpu_repository, specs.ENC_DEC),
                                      specs.ENC_DEC, "cuda", TorchSettings(cuda_graphs=True))
    assert graphed.warm_up((1, 4)) == [1, 4]
    d = eager.dims
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(1, d.fpn_dim, d.feat_hw, d.feat_hw, generator=gen)
    for n in (4, 1, 3, 4):
        text = torch.randn(n, d.text_len, d.text_dim, generator=gen)
        mask = torch.ones(n, d.text_len, dtype=torch.int32)
        for e, g in zip(eager(feats, text, mask), graphed(feats, text, mask), strict=True):
            assert g.is_cuda and g.shape[0] == n
            assert (e - g).abs().max().item() <= 1e-4


def test_shared_passes_with_cuda_graphs_replay_what_eager_computes(torch_gpu_repository):
    """Shared passes (frames 1, 2, 4 x prompts 1, 4 captured): passes over 1 to 3 frames,
    captured or padded to a captured shape, give each frame's rows as eager does alone."""
    from dart_triton.contract import specs
    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings, weights_dir

    path = weights_dir(torch_gpu_repository, specs.ENC_DEC)
    eager = TorchGraph.from_weights(path, specs.ENC_DEC, "cuda")
    graphed = TorchGraph.from_weights(path, specs.ENC_DEC, "cuda", TorchSettings(cuda_graphs=True))
    graphed.warm_up((1, 4), frames=(1, 2, 4))
    assert len(graphed._graphs) == 4  # (1, 1), (1, 4), (2, 4), (4, 4)
    d = eager.dims
    gen = torch.Generator().manual_seed(0)
    for index in ([0], [0, 1], [0, 1, 1], [0, 1, 2], [2, 0, 1, 1]):
        frames = max(index) + 1
        feats = torch.randn(frames, d.fpn_dim, d.feat_hw, d.feat_hw, generator=gen)
        text = torch.randn(len(index), d.text_len, d.text_dim, generator=gen)
        mask = torch.ones(len(index), d.text_len, dtype=torch.int32)
        rows = torch.tensor(index)
        got = graphed(feats, text, mask, rows)
        for k in range(frames):
            mine = rows == k
            for e, g in zip(eager(feats[k:k + 1], text[mine], mask[mine]), got, strict=True):
                assert g.is_cuda and g.shape[0] == len(index)
                assert (e - g[mine.cuda()]).abs().max().item() <= 1e-4


def test_kernel_profile_sees_the_gpu_kernels(torch_gpu_repository):
    """The profile step of scripts/gpu_check.sh on a GPU: CUDA kernels (not CPU operators),
    the matrix products among them, and device time within wall time."""
    from dart_triton.benchmarks import kernel_profile

    rows, kernels = kernel_profile.profile_repository(torch_gpu_repository, 3, 2)
    assert [r["graph"] for r in rows] == ["backbone", "enc_dec"]
    for row in rows:
        assert 0 < row["device_ms"] <= row["wall_ms"] * 1.05
        assert row["matmul_pct"] > 0 and row["tflops"] > 0
    assert kernels and all(k["device"] == "cuda" for k in kernels)
    assert not any(k["kernel"].startswith("aten::") for k in kernels)


@pytest.mark.server
def test_served_torch_gpu_pipeline_stays_on_the_gpu(torch_gpu_repository, naive, photo):
    """The bundled tritonserver serves the GPU torch repository; enc_dec receives the
    backbone's features in GPU memory (DLPack), and detections match the reference."""
    from dart_triton.client import DartClient
    from dart_triton.contract import specs
    from dart_triton.serving.server import TritonServer
    from tests.parity import NAMES
    from tests.unit.graphs.test_torch_graphs import graph_inputs

    with TritonServer(torch_gpu_repository, startup_timeout=300,
                      extra_args=["--exit-timeout-secs=5"]) as server:
        with DartClient(server.grpc_url) as c:
            served = c.detect(photo, NAMES[:5])  # a bucket of 4 (graph) + 1 (graph)
            with_masks = c.detect(photo, NAMES[:5], masks=True)
        ref = naive.detect(photo, NAMES[:5])
        assert graph_inputs(server, specs.ENC_DEC, specs.FPN_FEATURES, "gpu") >= 2
        assert graph_inputs(server, specs.ENC_DEC, specs.FPN_FEATURES, "cpu") == 0
        assert graph_inputs(server, specs.BACKBONE, specs.PIXEL_VALUES, "gpu") >= 1
        # masks: the encoder memory and the finer levels reach mask_decoder on the GPU
        for name in (specs.ENCODER_MEMORY, specs.KEPT_QUERIES):
            assert graph_inputs(server, specs.MASK_DECODER, name, "gpu") >= 1, name
            assert graph_inputs(server, specs.MASK_DECODER, name, "cpu") == 0, name
    _assert_masks_close(with_masks, naive.detect(photo, NAMES[:5], masks=True))
    # FP32 on the GPU (cuDNN may use TF32 for the patch embedding): close, not equal, so
    # two detections with near-equal scores may come in swapped order (seen on an H200):
    # compare them ordered by class and box.
    assert len(served) == len(ref)
    served, ref = _by_class_and_box(served), _by_class_and_box(ref)
    np.testing.assert_array_equal(served[0], ref[0])
    np.testing.assert_allclose(served[1], ref[1], atol=2e-3)
    np.testing.assert_allclose(served[2], ref[2], atol=2e-3 * 512)


def _assert_masks_close(served, ref) -> None:
    """Masks matched by class and box (near-equal scores may swap order on a GPU). FP32 on
    the GPU may run TF32 kernels, and the tiny random masks' logits are small (~1e-2), so
    pixels near the threshold flip more than on the CPU: IoU >= 0.95 rather than 0.99."""
    from tests.parity import mask_ious

    assert len(served) == len(ref) > 0
    order_s = np.lexsort((np.round(served.boxes[:, 1]), np.round(served.boxes[:, 0]),
                          served.class_ids))
    order_r = np.lexsort((np.round(ref.boxes[:, 1]), np.round(ref.boxes[:, 0]), ref.class_ids))
    pick = lambda d, order: type(d)(d.boxes[order], d.scores[order], d.class_ids[order],  # noqa: E731
                                    d.class_names, tuple(d.masks[i] for i in order),
                                    d.image_size)
    ious = mask_ious(pick(served, order_s), pick(ref, order_r))
    assert min(ious) >= 0.95, ious


def _by_class_and_box(d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.lexsort((np.round(d.boxes[:, 1]), np.round(d.boxes[:, 0]), d.class_ids))
    return d.class_ids[order], d.scores[order], d.boxes[order]
