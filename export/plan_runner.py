"""Run a serialized TensorRT plan on numpy inputs, with torch CUDA tensors as buffers.

Only the build-time verification uses this (Triton runs the plans in production), so it
favours clarity over speed: one execution context, inputs copied per call, everything on
one private CUDA stream so copies and the TensorRT launch are ordered without events (and
TensorRT is not handed the legacy default stream, which it warns about).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class PlanRunner:
    def __init__(self, plan: bytes, trt, logger=None) -> None:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            raise RuntimeError(
                "verifying a plan needs torch with CUDA for the device buffers (pip install "
                "torch on the GPU machine), or pass --skip-verify"
            )
        self.torch, self.trt = torch, trt
        # The runtime must outlive the engine it deserialized: keep it on the instance.
        self.runtime = trt.Runtime(logger or trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the plan it just built")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]

    def close(self) -> None:
        """Free the engine's device memory before the next (large) build."""
        self.context = None  # destroyed in dependency order: context, engine, runtime
        self.engine = None
        self.runtime = None
        self.torch.cuda.empty_cache()

    @property
    def num_profiles(self) -> int:
        return self.engine.num_optimization_profiles

    def _torch_dtype(self, name: str):
        np_dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return self.torch.from_numpy(np.zeros(1, np_dtype)).dtype, np_dtype

    def __call__(self, inputs: Mapping[str, np.ndarray], profile: int = 0) -> dict:
        torch, ctx, stream = self.torch, self.context, self.stream
        keep, outs = [], {}  # device buffers must outlive the launch
        with torch.cuda.stream(stream):
            if not ctx.set_optimization_profile_async(profile, stream.cuda_stream):
                raise RuntimeError(f"could not select optimisation profile {profile}")
            for name in self.inputs:
                if name not in inputs:
                    raise KeyError(f"plan input {name!r} not given (have {sorted(inputs)})")
                _, np_dtype = self._torch_dtype(name)
                arr = np.ascontiguousarray(inputs[name], dtype=np_dtype)
                buf = torch.from_numpy(arr).to("cuda", non_blocking=False)
                if not ctx.set_input_shape(name, tuple(arr.shape)):
                    lo, _opt, hi = self.engine.get_tensor_profile_shape(name, profile)
                    raise ValueError(f"{name} shape {list(arr.shape)} outside profile "
                                     f"{profile} (min {list(lo)}, max {list(hi)})")
                ctx.set_tensor_address(name, buf.data_ptr())
                keep.append(buf)
            for name in self.outputs:
                t_dtype, _ = self._torch_dtype(name)
                buf = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=t_dtype,
                                  device="cuda")
                ctx.set_tensor_address(name, buf.data_ptr())
                outs[name] = buf
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
        stream.synchronize()
        return {n: b.float().cpu().numpy() for n, b in outs.items()}
