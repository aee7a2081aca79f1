"""A batched enc_dec model's batch (shared passes) as Triton requests and responses.

Each request holds one or more items (Triton's batch dimension): a frame's features
[b, C, h, w] and its prompt rows [b, n, L, D] / [b, n, L]. Every item of every readable
request is decoded by `graphs.shared_passes.run_shared_passes`; each request gets its rows
back as [b, n, ...], only the outputs it asked for (the mask inputs are large and most
requests do not want them). A request that cannot be read (too many prompts, a missing
tensor) is answered alone; the others still run. Shared by the python (ONNX Runtime) and
torch graph models: they differ in how a Triton tensor becomes an array and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dart_triton.contract import specs
from dart_triton.contract.passes import check_pass_rows
from dart_triton.graphs.shared_passes import Array, Item, SharedGraph, run_shared_passes
from dart_triton.triton_models import pb

_INPUTS = (specs.FPN_FEATURES, specs.TEXT_FEATURES, specs.TEXT_MASK)


def _requested(request, outputs: Sequence[str]) -> list[str]:
    asked = getattr(request, "requested_output_names", None)
    names = set(asked()) if callable(asked) else set()
    return [n for n in outputs if n in names] or list(outputs)


def respond_shared(requests, graph: SharedGraph, max_classes: int, outputs: Sequence[str],
                   read: Callable[[str, Any], Array], write: Callable[[str, list[Array]], Any]
                   ) -> list:
    """One response per request. `read(name, triton_tensor)` -> array; `write(name, rows
    of each item)` -> the Triton tensor [b, n, ...] of one output of one request."""

    def items_of(request) -> tuple[list[Item], list[str]]:
        feats, text, mask = (read(n, pb.required_input(request, n)) for n in _INPUTS)
        if not (feats.shape[0] == text.shape[0] == mask.shape[0]) or text.ndim != 4:
            raise ValueError(f"enc_dec takes items of a frame and its prompts: {_INPUTS[0]} "
                             f"[b, C, h, w], {_INPUTS[1]} [b, n, L, D], {_INPUTS[2]} [b, n, L]; "
                             f"got {list(feats.shape)}, {list(text.shape)}, {list(mask.shape)}")
        check_pass_rows(int(text.shape[1]), max_classes)
        return ([Item(feats[i:i + 1], text[i], mask[i]) for i in range(feats.shape[0])],
                _requested(request, outputs))

    def run(reads: list[tuple[list[Item], list[str]]]) -> list[list]:
        flat = [item for items, _ in reads for item in items]
        results = iter(run_shared_passes(graph, flat, max_classes))
        answers = []
        for items, names in reads:
            rows = [next(results) for _ in items]
            answers.append([write(n, [r[outputs.index(n)] for r in rows]) for n in names])
        return answers

    return pb.respond_batch(requests, items_of, run)
