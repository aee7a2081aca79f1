"""Checking a freshly built plan against the FP32 reference, before it is installed.

The reference (ONNX Runtime on the CPU, or the checkpoint's PyTorch modules on the GPU),
the real inputs (the packaged photograph, real class names) and the FPN features enc_dec
is checked on are each made once per build (`PlanChecker`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange
from dart_triton.export.tensorrt.options import PlanBuildOptions, TensorRTPath, tensorrt_step
from dart_triton.export.tensorrt.profiles import MODELS, backbone_from_description
from dart_triton.export.tensorrt.verify import (
    Reference,
    TextSample,
    backbone_cases,
    enc_dec_cases,
    load_sample,
    pick_reference,
    real_text,
    sample_text,
    verify_plan,
)


class PlanChecker:
    """The reference, the real inputs and the FPN features enc_dec is checked on, each
    made once per build."""

    def __init__(self, onnx_dir: Path, repo_dir: Path, dims: specs.GraphDims,
                 opts: PlanBuildOptions, meta: Mapping, log: Callable[[str], None]) -> None:
        self.onnx_dir, self.repo_dir, self.dims, self.opts = onnx_dir, repo_dir, dims, opts
        self.checkpoint = meta.get("checkpoint")
        self.backbone = backbone_from_description(meta.get("backbone"))
        self.sample = load_sample(opts.sample)
        self.log = log
        self._reference: Reference | None = None
        self._fpn: tuple[np.ndarray, str] | None = None
        self._text: TextSample | None = None

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            graphs = {m: self.onnx_dir / f"{m}.onnx" for m in MODELS}
            self._reference = pick_reference(graphs, self.dims, self.checkpoint,
                                             self.backbone, log=self.log)
        return self._reference

    def fpn(self) -> tuple[np.ndarray, str]:
        """FPN features of the photo from the reference backbone (for enc_dec's check)."""
        if self._fpn is None:
            ref = self.reference
            if hasattr(ref, "parts") or (self.onnx_dir / "backbone.onnx").is_file():
                case = backbone_cases(self.dims, self.sample)[0]
                self._fpn = (ref.run(specs.BACKBONE, case.inputs)[specs.FPN_FEATURES],
                             f"reference features of the {case.label}")
            else:  # only enc_dec.onnx given and no checkpoint: features of the right size
                rng = np.random.default_rng(self.opts.seed + 2)
                h = self.dims.feat_hw
                self._fpn = (rng.standard_normal((1, self.dims.fpn_dim, h, h)).astype(
                    np.float32), "random FPN features (no backbone graph or checkpoint)")
        return self._fpn

    def text(self, rows: int) -> TextSample:
        if self._text is None:
            self._text = sample_text(self.sample, rows)
        if self._text is None:
            parts = getattr(self.reference, "parts", None)
            encoder = None
            if parts is not None and not (self.repo_dir / specs.TEXT_ENCODER).is_dir():
                from dart_triton.model.text_encoder import TextEncoder

                encoder = TextEncoder.from_sam3(parts.model, parts.tokenizer)
            self._text = real_text(self.dims, rows, self.repo_dir, self.checkpoint,
                                   encoder=encoder, source=f"the checkpoint {self.checkpoint}",
                                   seed=self.opts.seed)
            if self._text.label.startswith("random"):
                self.log(f"[build-plans] warning: {self._text.label}")
        return self._text

    def verify(self, model: str, ranges: list[ProfileRange], run_plan) -> dict:
        ref = self.reference
        if model == specs.BACKBONE:
            cases = backbone_cases(self.dims, self.sample)
            inputs = {"pixels": cases[0].label}
        else:
            fpn, fpn_label = self.fpn()
            text = self.text(max(r.max for r in ranges))
            cases = enc_dec_cases(ranges, fpn, text)
            inputs = {"fpn_features": fpn_label, "text": text.label}
        result = verify_plan(model, cases, ref.runner(model), run_plan,
                             self.opts.tolerances, reference_name=ref.name)
        return {**result, "inputs": inputs}


def check_plan(trt, model: str, ranges: list[ProfileRange], path: TensorRTPath, blob: bytes,
               checker: PlanChecker, logger) -> dict:
    """Load `blob` (a serialized plan of `model`) and compare it with the reference."""
    from dart_triton.export.tensorrt.executor import PlanExecutor

    with tensorrt_step(f"loading the {model} plan for verification", path):
        runner = PlanExecutor(blob, trt, logger)

    def run_plan(inputs, profile: int = 0) -> dict:
        with tensorrt_step(f"running the {model} plan (profile {profile})", path):
            return runner(inputs, profile)

    try:
        return checker.verify(model, ranges, run_plan)
    finally:
        runner.close()

