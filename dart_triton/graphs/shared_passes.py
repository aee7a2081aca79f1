"""Shared passes: the prompts of several frames decoded in one enc_dec pass.

Concurrent requests reach a batched enc_dec model (`specs.shared_enc_dec_spec`) as one
batch, each a frame and its prompt rows. `run_shared_passes` packs them into passes of at
most `max_rows` rows (`contract.passes.plan_shared_passes`): the frames of a pass are
stacked ([F, C, h, w]), their rows concatenated ([N, L, D]) with a row -> frame index,
the graph runs once per pass (`BatchedDetectionHead`: the image-only work once per frame,
then per row), and each request gets its own rows back. Rows are independent in the
pass (paper §3.2), so a request's rows are what it would get alone.

numpy arrays (ONNX Runtime) or torch tensors (the torch backend, on their device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from dart_triton.contract.passes import plan_shared_passes

Array = np.ndarray | torch.Tensor


class Item(NamedTuple):
    """One request of a batch: its frame and its prompt rows."""

    features: Array  # [1, C, h, w]
    text_features: Array  # [n, L, D]
    text_mask: Array  # [n, L]


# (features [F, C, h, w], text [N, L, D], mask [N, L], frame_index [N]) -> outputs [N, ...]
SharedGraph = Callable[[Array, Array, Array, Array], Sequence[Array]]


def _cat(parts: Sequence[Array]) -> Array:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat([p.to(parts[0].device) for p in parts])
    return np.concatenate(parts)


def _frame_index(counts: list[int], like: Array) -> Array:
    """[N] int64: each item's index, once per row of it (on `like`'s device for torch)."""
    index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return torch.from_numpy(index).to(like.device) if isinstance(like, torch.Tensor) else index


def _split(output: Array, counts: list[int]) -> list[Array]:
    if isinstance(output, torch.Tensor):
        return list(output.split(counts))
    return np.split(output, np.cumsum(counts)[:-1])


def shared_passes(graph: SharedGraph, items: Sequence[Item], max_rows: int
                  ) -> Iterator[tuple[list[int], list[tuple[Array, ...]]]]:
    """Pass by pass, as each finishes: (the indices of its items, each one's outputs
    ([n, ...] each, the graph's order)). A caller can answer those items before the next
    pass runs."""
    rows = [int(it.text_features.shape[0]) for it in items]
    for members in plan_shared_passes(rows, max_rows):
        group = [items[i] for i in members]
        counts = [rows[i] for i in members]
        outputs = graph(_cat([it.features for it in group]),
                        _cat([it.text_features for it in group]),
                        _cat([it.text_mask for it in group]),
                        _frame_index(counts, group[0].features))
        yield members, [tuple(rows) for rows in zip(*(_split(o, counts) for o in outputs),
                                                    strict=True)]


def run_shared_passes(graph: SharedGraph, items: Sequence[Item], max_rows: int
                      ) -> list[tuple[Array, ...]]:
    """Every item's outputs ([n, ...] each, the graph's order), in the order of `items`."""
    results: list[tuple[Array, ...]] = [()] * len(items)
    for members, rows in shared_passes(graph, items, max_rows):
        for i, r in zip(members, rows, strict=True):
            results[i] = r
    return results
