"""Run a serialized TensorRT plan on numpy inputs (build-time verification only).

Triton runs the plans in production; this runner favours clarity over speed. Per call it
makes the TensorRT calls in the order the API requires:

1. ``set_optimization_profile_async(profile, stream)`` when the profile changes (before
   any input shape: shapes are checked against the selected profile);
2. ``set_input_shape`` for every input, then ``set_tensor_address`` for it;
3. the output shapes, known only once every input shape is set, and their addresses;
4. ``execute_async_v3(stream)``, then one synchronisation of that stream.

Device memory comes from a :class:`DeviceBuffers` implementation: CUDA through torch in
production (everything on one private stream, so copies and the launch are ordered
without events, and TensorRT never gets the legacy default stream), host memory in the
CPU tests, where a recording stand-in for the execution context checks the order above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class DeviceBuffers(Protocol):
    """Where the runner's tensors live and the stream its work is ordered on."""

    stream_handle: int

    def upload(self, array: np.ndarray) -> tuple[Any, int]:
        """A device copy of `array` -> (buffer, address)."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, int]:
        """An uninitialised device buffer -> (buffer, address)."""

    def download(self, buffer: Any) -> np.ndarray:
        """The buffer's contents as float32 numpy (after `synchronize`)."""

    def synchronize(self) -> None: ...

    def release(self) -> None:
        """Give cached device memory back (before the next, large, build)."""


class TorchCudaBuffers:
    """CUDA memory from torch, on one private stream."""

    def __init__(self) -> None:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise RuntimeError(
                "verifying a plan needs torch with CUDA for the device buffers (pip install "
                "torch on the GPU machine), or pass --skip-verify"
            )
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.stream_handle = self.stream.cuda_stream

    def _dtype(self, dtype: np.dtype):
        return self.torch.from_numpy(np.zeros(1, dtype)).dtype

    def upload(self, array: np.ndarray) -> tuple[Any, int]:
        with self.torch.cuda.stream(self.stream):
            buf = self.torch.from_numpy(array).to("cuda", non_blocking=False)
        return buf, buf.data_ptr()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, int]:
        with self.torch.cuda.stream(self.stream):
            buf = self.torch.empty(shape, dtype=self._dtype(dtype), device="cuda")
        return buf, buf.data_ptr()

    def download(self, buffer: Any) -> np.ndarray:
        return buffer.float().cpu().numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def release(self) -> None:
        self.torch.cuda.empty_cache()


class PlanExecutor:
    """One engine and one execution context; ``runner(inputs, profile) -> outputs``."""

    def __init__(self, plan: bytes, trt, logger=None,
                 buffers: DeviceBuffers | None = None) -> None:
        self.buffers = buffers if buffers is not None else TorchCudaBuffers()
        self.trt = trt
        # The runtime must outlive the engine it deserialized: keep it on the instance.
        self.runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the plan it just built")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context for the plan")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]
        self._profile: int | None = None  # a new context starts on profile 0, unselected

    def close(self) -> None:
        """Free the engine's device memory before the next (large) build."""
        self.context = None  # destroyed in dependency order: context, engine, runtime
        self.engine = None
        self.runtime = None
        self.buffers.release()

    @property
    def num_profiles(self) -> int:
        return self.engine.num_optimization_profiles

    def _np_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _select_profile(self, profile: int) -> None:
        if not 0 <= profile < self.num_profiles:
            raise ValueError(f"profile {profile} out of range: the plan has "
                             f"{self.num_profiles}")
        if profile != self._profile:
            if not self.context.set_optimization_profile_async(profile,
                                                               self.buffers.stream_handle):
                raise RuntimeError(f"could not select optimisation profile {profile}")
            self._profile = profile

    def __call__(self, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict:
        ctx, buffers = self.context, self.buffers
        missing = [n for n in self.inputs if n not in inputs]
        if missing:
            raise KeyError(f"plan inputs {missing} not given (have {sorted(inputs)})")
        self._select_profile(profile)
        keep, outs = [], {}  # device buffers must outlive the launch
        for name in self.inputs:
            arr = np.ascontiguousarray(inputs[name], dtype=self._np_dtype(name))
            if not ctx.set_input_shape(name, tuple(arr.shape)):
                lo, _opt, hi = self.engine.get_tensor_profile_shape(name, profile)
                raise ValueError(f"{name} shape {list(arr.shape)} outside profile "
                                 f"{profile} (min {list(lo)}, max {list(hi)})")
            buf, address = buffers.upload(arr)
            ctx.set_tensor_address(name, address)
            keep.append(buf)
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"TensorRT left output {name} shape {list(shape)} "
                                   "unresolved after every input shape was set")
            buf, address = buffers.empty(shape, self._np_dtype(name))
            ctx.set_tensor_address(name, address)
            outs[name] = buf
        if not ctx.execute_async_v3(buffers.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        buffers.synchronize()
        return {n: buffers.download(b) for n, b in outs.items()}
