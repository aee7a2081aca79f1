"""One request through the graphs, shared by `DartPipeline` (in process) and `dart` (BLS).

    pixel_values ─► backbone ─────────────┐  (at once: the backbone runs once per image)
    class names  ─► text encoder (cache) ─┴► enc_dec pass 1 ∥ pass 2 ∥ ... ─► HeadOutputs

The passes come from `contract.passes.plan_passes`: N prompts in passes of at most
`max_classes` (DART §3.4), padded up to a bucket when the enc_dec engine has buckets.
A `GraphRunner` says how each step runs: in this process (`InProcessRunner`), or as BLS
calls to the other Triton models (`triton_models.dart_model.BlsRunner`). The
orchestration is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from dart_triton.contract.passes import Pass, pad_to_bucket, unpad

T = TypeVar("T")
Array = np.ndarray | torch.Tensor


class HeadOutputs(NamedTuple):
    """What the detection head returns for N prompts (enc_dec's outputs, in spec order);
    the last two only when asked for (masks)."""

    boxes: Array  # [N, Q, 4] xyxy, normalised to [0, 1]
    logits: Array  # [N, Q] per-query class logits
    presence_logits: Array  # [N, 1] is the class in the image at all
    encoder_memory: Array | None = None  # [N, h*w, C] (specs.MASK_INPUTS)
    decoder_queries: Array | None = None  # [N, Q, C]

    @property
    def detection(self) -> tuple[Array, Array, Array]:
        """(boxes, logits, presence logits): what selection reads."""
        return self.boxes, self.logits, self.presence_logits

    @classmethod
    def concat(cls, chunks: Sequence[HeadOutputs]) -> HeadOutputs:
        """Passes side by side along the prompt axis, in the order given. numpy arrays,
        or torch tensors (which stay on their device: NMS then runs there too)."""
        def cat(parts):
            if parts[0] is None:
                return None
            if isinstance(parts[0], torch.Tensor):
                return torch.cat(parts, dim=0)
            return np.concatenate(parts, axis=0)

        return cls(*(cat(parts) for parts in zip(*chunks, strict=True)))

    def rows(self, n: int) -> HeadOutputs:
        """The first n prompts (drops the rows a pass was padded with)."""
        return HeadOutputs(*(None if t is None else unpad(t, n) for t in self))


class ModelCallError(RuntimeError):
    """A step failed for a reason that is not the request's fault (a dead or failing
    model): the server's problem, answered as INTERNAL, or UNAVAILABLE when retrying
    later can help."""

    def __init__(self, model: str, message: str, unavailable: bool = False):
        super().__init__(f"model '{model}' failed: {message}")
        self.model = model
        self.unavailable = unavailable


class GraphRunner(Protocol):
    """How each step runs. `Features`/text tensors are whatever the runner hands itself
    (numpy arrays, torch tensors, Triton tensors); text tensors must support row indexing.
    The mask arguments are for requests that want masks (`pipeline.masks`).
    `passes_in_flight` (optional attribute): at most that many enc_dec passes of one
    request at once (0 or absent: all of them)."""

    async def backbone(self, pixel_values: Any, mask_levels: bool = False) -> Any:
        """The detection level; with `mask_levels`, ``[detection level, *finer levels]``."""
        ...

    async def text(self, names: list[str]) -> tuple[Any, Any]: ...

    async def enc_dec(self, features: Any, text_features: Any, text_mask: Any,
                      mask_inputs: bool = False) -> HeadOutputs: ...

    async def mask_decoder(self, levels: list, encoder_memory: torch.Tensor,
                           text_features: torch.Tensor, text_mask: torch.Tensor,
                           kept_queries: torch.Tensor) -> Array:
        """mask_logits [P, J, m, m] (`specs.mask_decoder_spec`)."""
        ...


class MaskCollector(Protocol):
    """Keeps, pass by pass, what the mask head will need (`pipeline.masks.MaskSources`)."""

    def add(self, start: int, head: HeadOutputs) -> None: ...

    def set_inputs(self, levels: list, text_features: Any, text_mask: Any) -> None: ...


async def _decode(runner: GraphRunner, features: Any, text_features: Any, text_mask: Any,
                  p: Pass, masks: MaskCollector | None) -> HeadOutputs:
    feats, mask = pad_to_bucket(text_features[p.start:p.stop], text_mask[p.start:p.stop], p.rows)
    head = (await runner.enc_dec(features, feats, mask, masks is not None)).rows(
        p.stop - p.start)
    if masks is None:
        return head
    masks.add(p.start, head)  # keeps the rows masks may need; the rest is freed with `head`
    return HeadOutputs(*head.detection)


async def run_graphs(runner: GraphRunner, pixel_values: Any, names: list[str],
                     passes: Sequence[Pass], masks: MaskCollector | None = None) -> HeadOutputs:
    """Backbone ∥ text encoding, then every enc_dec pass in flight at once. With `masks`,
    the backbone's finer levels and enc_dec's mask inputs are asked for and handed to it."""
    levels, (text_features, text_mask) = await asyncio.gather(
        runner.backbone(pixel_values, masks is not None), runner.text(names))
    features = levels
    if masks is not None:
        features, *finer = levels
        masks.set_inputs(finer, text_features, text_mask)
    # A bound on one request's passes in flight: where passes of several requests share a
    # queue (shared passes), a request with many prompts then queues a few at a time and
    # the passes of requests that came later go in between (fairness).
    limit = getattr(runner, "passes_in_flight", 0)
    gate = asyncio.Semaphore(limit) if limit else contextlib.nullcontext()

    async def decode(p: Pass) -> HeadOutputs:
        async with gate:
            return await _decode(runner, features, text_features, text_mask, p, masks)

    return HeadOutputs.concat(await asyncio.gather(*(decode(p) for p in passes)))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop
    (a notebook): then on a private loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="dart-run-sync")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
