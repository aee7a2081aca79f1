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
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from dart_triton.contract.passes import Pass, pad_to_bucket, unpad

T = TypeVar("T")
Array = np.ndarray | torch.Tensor


class HeadOutputs(NamedTuple):
    """What the detection head returns for N prompts (enc_dec's outputs, in spec order)."""

    boxes: Array  # [N, Q, 4] xyxy, normalised to [0, 1]
    logits: Array  # [N, Q] per-query class logits
    presence_logits: Array  # [N, 1] is the class in the image at all

    @classmethod
    def concat(cls, chunks: Sequence[HeadOutputs]) -> HeadOutputs:
        """Passes side by side along the prompt axis, in the order given. numpy arrays,
        or torch tensors (which stay on their device: NMS then runs there too)."""
        def cat(parts):
            if isinstance(parts[0], torch.Tensor):
                return torch.cat(parts, dim=0)
            return np.concatenate(parts, axis=0)

        return cls(*(cat(parts) for parts in zip(*chunks, strict=True)))

    def rows(self, n: int) -> HeadOutputs:
        """The first n prompts (drops the rows a pass was padded with)."""
        return HeadOutputs(*(unpad(t, n) for t in self))


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
    (numpy arrays, torch tensors, Triton tensors); text tensors must support row indexing."""

    async def backbone(self, pixel_values: Any) -> Any: ...

    async def text(self, names: list[str]) -> tuple[Any, Any]: ...

    async def enc_dec(self, features: Any, text_features: Any, text_mask: Any) -> HeadOutputs: ...


async def _decode(runner: GraphRunner, features: Any, text_features: Any, text_mask: Any,
                  p: Pass) -> HeadOutputs:
    feats, mask = pad_to_bucket(text_features[p.start:p.stop], text_mask[p.start:p.stop], p.rows)
    return (await runner.enc_dec(features, feats, mask)).rows(p.stop - p.start)


async def run_graphs(runner: GraphRunner, pixel_values: Any, names: list[str],
                     passes: Sequence[Pass]) -> HeadOutputs:
    """Backbone ∥ text encoding, then every enc_dec pass in flight at once."""
    features, (text_features, text_mask) = await asyncio.gather(
        runner.backbone(pixel_values), runner.text(names))
    return HeadOutputs.concat(await asyncio.gather(
        *(_decode(runner, features, text_features, text_mask, p) for p in passes)))


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
