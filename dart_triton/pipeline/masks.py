"""Masks for the kept detections, shared by `DartPipeline` and `dart` (like `orchestration`).

    enc_dec passes ─► MaskSources (rows of prompts that may keep a detection)
    select ─► kept (prompt, query) ─► mask_decoder, a chunk of prompts at a time ─► RLE

Only prompts with a query above the score threshold keep their encoder memory while the
passes run (the rest could never keep a detection), only prompts that did keep one go
to `mask_decoder`, and only their kept queries. Chunks of at most `max_prompts` prompts,
each encoded to RLE (`model.masks`) before the next: memory stays bounded by a chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dart_triton.contract.validation import DetectOptions, MaskOptions
from dart_triton.model.masks import mask_rles
from dart_triton.model.postprocess import select_kept
from dart_triton.pipeline.orchestration import Array, GraphRunner, HeadOutputs, run_graphs


def _torch(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


class MaskSources:
    """What `mask_decoder` needs of one request, gathered while its passes run."""

    def __init__(self, score_threshold: float):
        self.score_threshold = score_threshold
        self.levels: list = []
        self.text_features: torch.Tensor | None = None
        self.text_mask: torch.Tensor | None = None
        # prompt index -> (encoder memory [h*w, C], decoder queries [Q, C])
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_inputs(self, levels: list, text_features: Any, text_mask: Any) -> None:
        self.levels = list(levels)
        self.text_features, self.text_mask = _torch(text_features), _torch(text_mask)

    def add(self, start: int, head: HeadOutputs) -> None:
        """Keep the rows of prompts with a query scoring above the threshold (scored as
        `model.postprocess.select` scores: in float64)."""
        logits = _torch(head.logits).double()
        presence = _torch(head.presence_logits).double().reshape(-1, 1).to(logits.device)
        scores = torch.sigmoid(logits) * torch.sigmoid(presence)
        rows = torch.nonzero((scores > self.score_threshold).any(dim=1)).flatten().tolist()
        if not rows:
            return
        memory, queries = _torch(head.encoder_memory), _torch(head.decoder_queries)
        kept_memory, kept_queries = memory[rows], queries[rows]  # copies: the pass is freed
        for i, row in enumerate(rows):
            self.rows[start + row] = (kept_memory[i], kept_queries[i])


def _chunks(prompts: Sequence[int], size: int) -> list[list[int]]:
    return [list(prompts[i:i + size]) for i in range(0, len(prompts), size)]


async def run_masks(runner: GraphRunner, sources: MaskSources, class_ids: np.ndarray,
                    query_ids: np.ndarray, image_size: tuple[int, int], threshold: float,
                    max_prompts: int) -> list[bytes]:
    """COCO RLE counts of each kept detection's mask at `image_size`, in the order given.

    Prompts are taken in order of their kept count, so a chunk pads its prompts' queries
    to similar counts (J: the chunk's largest)."""
    rles: list[bytes] = [b""] * len(class_ids)
    by_prompt: dict[int, list[int]] = {}
    for det, prompt in enumerate(np.asarray(class_ids).tolist()):
        by_prompt.setdefault(prompt, []).append(det)
    missing = sorted(set(by_prompt) - set(sources.rows))
    if missing:  # select kept a prompt `add` judged hopeless: a bug, not the request's fault
        raise RuntimeError(f"no mask inputs kept for prompts {missing}")
    prompts = sorted(by_prompt, key=lambda p: (len(by_prompt[p]), p))
    for chunk in _chunks(prompts, max_prompts):
        width = max(len(by_prompt[p]) for p in chunk)
        memory = torch.stack([sources.rows[p][0] for p in chunk])
        queries = []
        for p in chunk:
            picks = [int(query_ids[d]) for d in by_prompt[p]]
            picks += [picks[-1]] * (width - len(picks))  # padding rows: dropped below
            queries.append(sources.rows[p][1][picks])
        text_rows = torch.tensor(chunk, device=sources.text_features.device)
        logits: Array = await runner.mask_decoder(
            sources.levels, memory, sources.text_features[text_rows],
            sources.text_mask[text_rows.to(sources.text_mask.device)], torch.stack(queries))
        logits = _torch(logits)
        for i, p in enumerate(chunk):
            dets = by_prompt[p]
            for det, rle in zip(dets, mask_rles(logits[i, :len(dets)], image_size, threshold),
                                strict=True):
                rles[det] = rle
    return rles


async def detect_with_masks(runner: GraphRunner, pixel_values: Any, names: list[str],
                            passes: Sequence, image_size: tuple[int, int],
                            options: DetectOptions, mask_options: MaskOptions,
                            max_prompts: int) -> tuple[tuple[np.ndarray, ...], list[bytes]]:
    """One request with masks: ((boxes, scores, class ids), RLE counts per detection)."""
    sources = MaskSources(options.score_threshold)
    head = await run_graphs(runner, pixel_values, names, passes, sources)
    boxes, scores, class_ids, query_ids = select_kept(*head.detection, image_size, options)
    rles = await run_masks(runner, sources, class_ids, query_ids, image_size,
                           mask_options.mask_threshold, max_prompts)
    return (boxes, scores, class_ids), rles
