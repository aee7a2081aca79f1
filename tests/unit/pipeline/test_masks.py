"""Masks in process: the torch modules and the exported ONNX graphs (what the torch and
python backends serve) against SAM3's own masks, for all three tiny variants; and how
`run_masks` feeds the mask head (kept prompts and queries only, bounded chunks)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from dart_triton.graphs.runtime import OrtGraphs
from dart_triton.model.masks import decode_rle
from dart_triton.model.parts import load_parts
from dart_triton.pipeline.detectors import DartPipeline, NaivePipeline
from dart_triton.pipeline.masks import MaskSources, run_masks
from dart_triton.pipeline.orchestration import HeadOutputs
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import NAMES, assert_same_masks

COUNTS = [1, 3, 3 * TEST_MAX_CLASSES]


@pytest.fixture(scope="module")
def mask_pipelines(any_tiny_checkpoint, tmp_path_factory):
    """(naive reference, torch modules, ONNX Runtime graphs) of one variant, with masks."""
    from dart_triton.export.onnx_export import export_graphs

    parts = load_parts(any_tiny_checkpoint, max_classes=TEST_MAX_CLASSES, masks=True)
    onnx_dir = tmp_path_factory.mktemp("onnx_masks")
    _, agreements = export_graphs(any_tiny_checkpoint, onnx_dir, max_classes=TEST_MAX_CLASSES,
                                  masks=True, log=lambda *_: None)
    assert {a.tensor for a in agreements} >= {"mask_logits", "encoder_memory"}
    assert all(a.ok for a in agreements), agreements  # cosine >= 0.99999, ORT vs PyTorch
    return (NaivePipeline(parts.model, parts.tokenizer), DartPipeline.from_parts(parts),
            DartPipeline.from_parts(parts, OrtGraphs(onnx_dir)))


@pytest.mark.parametrize("n", COUNTS)
def test_masks_equal_sam3s(mask_pipelines, photo, n):
    naive, torch_modules, onnx_graphs = mask_pipelines
    image = photo[40:400, 10:500]  # not square: the resize back is per axis
    ref = naive.detect(image, NAMES[:n], masks=True)
    assert ref.image_size == image.shape[:2]
    for dart in (torch_modules, onnx_graphs):
        assert_same_masks(dart.detect(image, NAMES[:n], masks=True), ref, max(image.shape))


def test_without_masks_nothing_changes(mask_pipelines, photo):
    naive, torch_modules, _ = mask_pipelines
    plain = torch_modules.detect(photo, NAMES[:3])
    assert plain.masks is None
    with_masks = torch_modules.detect(photo, NAMES[:3], masks=True)
    np.testing.assert_array_equal(plain.boxes, with_masks.boxes)
    np.testing.assert_array_equal(plain.class_ids, with_masks.class_ids)


class _RecordingRunner:
    """mask_decoder stand-in: logits that say which (prompt row, query) they are for."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    async def mask_decoder(self, levels, memory, text_features, text_mask, queries):
        self.calls.append((memory.shape[0], queries.shape[1]))
        assert text_features.shape[0] == text_mask.shape[0] == memory.shape[0]
        # memory rows carry their prompt's id, queries their own: a mask of
        # prompt * 10 + query + 1 pixels (of a 1 x 100 image) says whose it is
        area = memory[:, :1, :1] * 10 + queries[:, :, :1] + 1  # [P, J, 1]
        x = torch.arange(100.0)
        return torch.where(x < area, 5.0, -5.0)[:, :, None, :]  # [P, J, 1, 100]


def test_run_masks_feeds_only_kept_prompts_and_queries_in_chunks():
    q, hw, c = 6, 4, 3
    sources = MaskSources(score_threshold=0.5)
    sources.set_inputs([], torch.zeros(7, 2, c), torch.ones(7, 2, dtype=torch.int32))
    logits = torch.full((7, q), -9.0)
    logits[[0, 2, 3, 5, 6], 0] = 9.0  # prompts 1 and 4 have no candidate
    memory = torch.arange(7.0)[:, None, None].expand(7, hw, c).clone()
    queries = torch.arange(float(q))[None, :, None].expand(7, q, c).clone()
    sources.add(0, HeadOutputs(torch.zeros(7, q, 4), logits, torch.full((7, 1), 9.0),
                               memory, queries))
    assert sorted(sources.rows) == [0, 2, 3, 5, 6]
    runner = _RecordingRunner()
    class_ids = np.array([3, 0, 3, 6, 3, 5])
    query_ids = np.array([4, 0, 1, 2, 5, 3])
    rles = asyncio.run(run_masks(runner, sources, class_ids, query_ids, (1, 100), 0.5, 2))
    areas = [int(decode_rle(r, (1, 100)).sum()) for r in rles]
    assert areas == [p * 10 + q + 1 for p, q in zip(class_ids, query_ids, strict=True)]
    # at most max_prompts (2) per call, each kept prompt once; by kept count, so the
    # prompt with three kept queries comes last and sets J = 3 for its chunk
    assert runner.calls == [(2, 1), (2, 3)]
