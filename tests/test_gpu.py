"""GPU checks that need CUDA but not TensorRT (they run on a lent GPU; skip elsewhere)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dart_triton.export.onnx_export import cosine
from dart_triton.preprocess import preprocess_tensor

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
