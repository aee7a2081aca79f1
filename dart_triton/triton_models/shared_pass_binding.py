"""A batched enc_dec model's batch (shared passes) as Triton requests and responses.

Each request holds one or more items (Triton's batch dimension): a frame's features
[b, C, h, w] and its prompt rows [b, n, L, D] / [b, n, L]. Every item of every readable
request is decoded by `graphs.shared_passes.shared_passes`; each request gets its rows
back as [b, n, ...], only the outputs it asked for (the mask inputs are large and most
requests do not want them). A request that cannot be read (too many prompts, a missing
tensor) is answered alone; the others still run.

Each request is answered as soon as the pass holding its last item has run, through its
response sender (a non-decoupled model may send its one final response itself; then
`execute` returns None): a batch of several passes does not hold its first frames back
until its last pass is done, so their next steps (and the cameras' next frames) start
while the later passes run. If a pass fails, every request not yet answered gets the
error. Shared by the python (ONNX Runtime) and torch graph models: they differ in how a
Triton tensor becomes an array and back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dart_triton.contract import specs
from dart_triton.contract.passes import check_pass_rows
from dart_triton.graphs.shared_passes import Array, Item, SharedGraph, shared_passes
from dart_triton.triton_models import pb

_INPUTS = (specs.FPN_FEATURES, specs.TEXT_FEATURES, specs.TEXT_MASK)


def _requested(request, outputs: Sequence[str]) -> list[str]:
    asked = getattr(request, "requested_output_names", None)
    names = set(asked()) if callable(asked) else set()
    return [n for n in outputs if n in names] or list(outputs)


def _send(request, response) -> None:
    request.get_response_sender().send(
        response, flags=pb.pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def respond_shared(requests, graph: SharedGraph, max_classes: int, outputs: Sequence[str],
                   read: Callable[[str, Any], Array], write: Callable[[str, list[Array]], Any]
                   ) -> None:
    """Answers every request through its response sender. `read(name, triton_tensor)` ->
    array; `write(name, rows of each item)` -> the Triton tensor [b, n, ...] of one output
    of one request."""

    def items_of(request) -> list[Item]:
        feats, text, mask = (read(n, pb.required_input(request, n)) for n in _INPUTS)
        if not (feats.shape[0] == text.shape[0] == mask.shape[0]) or text.ndim != 4:
            raise ValueError(f"enc_dec takes items of a frame and its prompts: {_INPUTS[0]} "
                             f"[b, C, h, w], {_INPUTS[1]} [b, n, L, D], {_INPUTS[2]} [b, n, L]; "
                             f"got {list(feats.shape)}, {list(text.shape)}, {list(mask.shape)}")
        check_pass_rows(int(text.shape[1]), max_classes)
        return [Item(feats[i:i + 1], text[i], mask[i]) for i in range(feats.shape[0])]

    items: list[Item] = []
    owner: list[int] = []  # item -> request
    waiting: dict[int, int] = {}  # request -> items not decoded yet
    for i, request in enumerate(requests):
        try:
            mine = items_of(request)
        except ValueError as exc:
            _send(request, pb.error_response(exc))
            continue
        items += mine
        owner += [i] * len(mine)
        waiting[i] = len(mine)
    rows: dict[int, list[tuple[Array, ...]]] = {i: [] for i in waiting}
    try:
        for members, outs in shared_passes(graph, items, max_classes):
            for item, out in zip(members, outs, strict=True):
                i = owner[item]
                rows[i].append(out)
                waiting[i] -= 1
                if waiting[i] == 0:
                    del waiting[i]
                    done = rows.pop(i)
                    tensors = [write(n, [r[outputs.index(n)] for r in done])
                               for n in _requested(requests[i], outputs)]
                    _send(requests[i], pb.pb_utils.InferenceResponse(output_tensors=tensors))
    except Exception as exc:  # a failing pass: whoever is still waiting hears of it
        for i in waiting:
            _send(requests[i], pb.error_response(exc))
        pb.log(f"enc_dec: a shared pass failed: {exc!r}", "error")
