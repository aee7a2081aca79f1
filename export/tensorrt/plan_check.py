"""Checking a freshly built plan against the FP32 reference, before it is installed.

The reference (ONNX Runtime on the CPU, or the checkpoint's PyTorch modules on the GPU),
the real inputs (the packaged photograph, real class names) and the FPN levels enc_dec
and mask_decoder are checked on are each made once per build (`PlanChecker`).
mask_decoder is checked as it is served: on the photograph's finer levels, the reference
enc_dec's encoder memory for the class names, and each prompt's best-scoring decoder
queries (those `dart` keeps first).
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
    VerifyCase,
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
        self._levels: tuple[dict[str, np.ndarray], str] | None = None
        self._text: TextSample | None = None

    @property
    def reference(self) -> Reference:
        if self._reference is None:
            graphs = {m: self.onnx_dir / f"{m}.onnx" for m in MODELS}
            self._reference = pick_reference(graphs, self.dims, self.checkpoint,
                                             self.backbone, log=self.log)
        return self._reference

    def _has(self, model: str) -> bool:
        return hasattr(self.reference, "parts") or (self.onnx_dir / f"{model}.onnx").is_file()

    def levels(self) -> tuple[dict[str, np.ndarray], str]:
        """Every backbone output on the photo from the reference backbone (the detection
        level for enc_dec's check, the finer ones for mask_decoder's)."""
        if self._levels is None:
            if self._has(specs.BACKBONE):
                case = backbone_cases(self.dims, self.sample)[0]
                self._levels = (self.reference.run(specs.BACKBONE, case.inputs),
                                f"reference features of the {case.label}")
            else:  # no backbone graph and no checkpoint: features of the right sizes
                rng = np.random.default_rng(self.opts.seed + 2)
                self._levels = ({t.name: rng.standard_normal(t.dims).astype(np.float32)
                                 for t in specs.backbone_spec(self.dims).outputs},
                                "random FPN features (no backbone graph or checkpoint)")
        return self._levels

    def fpn(self) -> tuple[np.ndarray, str]:
        """FPN features of the photo from the reference backbone (for enc_dec's check)."""
        levels, label = self.levels()
        return levels[specs.FPN_FEATURES], label

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

    def mask_cases(self, prompts: ProfileRange, queries: ProfileRange
                   ) -> tuple[list[VerifyCase], dict[str, str]]:
        """mask_decoder's cases, and where their inputs came from."""
        levels, label = self.levels()
        text = self.text(prompts.max)
        rows = {specs.TEXT_FEATURES: np.ascontiguousarray(text.features[:prompts.max]),
                specs.TEXT_MASK: np.ascontiguousarray(text.mask[:prompts.max])}
        if self._has(specs.ENC_DEC):
            head = self.reference.run(specs.ENC_DEC, {specs.FPN_FEATURES: levels[
                specs.FPN_FEATURES], **rows})
            how = "the best-scoring decoder queries of the reference enc_dec per prompt"
        else:  # no enc_dec graph and no checkpoint: mask inputs of the right sizes
            rng = np.random.default_rng(self.opts.seed + 3)
            d = self.dims
            head = {specs.ENCODER_MEMORY: rng.standard_normal(
                        (prompts.max, d.feat_hw ** 2, d.fpn_dim)).astype(np.float32),
                    specs.DECODER_QUERIES: rng.standard_normal(
                        (prompts.max, d.num_queries, d.fpn_dim)).astype(np.float32),
                    specs.PRED_LOGITS: np.zeros((prompts.max, d.num_queries), np.float32)}
            how = "random encoder memory and queries (no enc_dec graph or checkpoint)"
        cases = mask_decoder_cases(prompts, queries, {**levels, **rows, **head},
                                   text.label.split(" (")[0])
        return cases, {"fpn_levels": label, "text": text.label, "queries": how}

    def verify(self, model: str, ranges: list[ProfileRange], run_plan,
               queries: ProfileRange | None = None) -> dict:
        ref = self.reference
        if model == specs.BACKBONE:
            cases = backbone_cases(self.dims, self.sample, self.opts.max_batch)
            inputs = {"pixels": "; ".join(c.label for c in cases)}
        elif model == specs.MASK_DECODER:
            if queries is None:
                raise ValueError("mask_decoder: no range of kept queries to verify over")
            cases, inputs = self.mask_cases(ranges[0], queries)
        else:
            fpn, fpn_label = self.fpn()
            text = self.text(max(r.max for r in ranges))
            cases = enc_dec_cases(ranges, fpn, text)
            inputs = {"fpn_features": fpn_label, "text": text.label}
        result = verify_plan(model, cases, ref.runner(model), run_plan,
                             self.opts.tolerances, reference_name=ref.name)
        return {**result, "inputs": inputs}


def mask_decoder_cases(prompts: ProfileRange, queries: ProfileRange,
                       named: Mapping[str, np.ndarray], label: str) -> list[VerifyCase]:
    """(P, J) at both minima, at the opt, and each maximum with the other axis small (both
    maxima at once are P x J full-size masks, and J only widens the last matmul).

    ``named``: the backbone's levels, ``prompts.max`` rows of text, and enc_dec's outputs
    for them; each prompt's J kept queries are its best-scoring ones, as `dart` keeps."""
    order = np.argsort(-np.asarray(named[specs.PRED_LOGITS]), axis=1, kind="stable")
    ranked = np.take_along_axis(np.asarray(named[specs.DECODER_QUERIES], np.float32),
                                order[..., None], axis=1)
    shapes = sorted({(prompts.min, queries.min), (prompts.opt, queries.opt),
                     (prompts.max, queries.opt), (prompts.min, queries.max)})
    cases = []
    for p, j in shapes:
        inputs = {name: np.asarray(named[name], np.float32) for name in named
                  if name.startswith(specs.FPN_FEATURES) and name != specs.FPN_FEATURES}
        inputs.update({
            specs.ENCODER_MEMORY: np.ascontiguousarray(named[specs.ENCODER_MEMORY][:p],
                                                       np.float32),
            specs.TEXT_FEATURES: np.ascontiguousarray(named[specs.TEXT_FEATURES][:p]),
            specs.TEXT_MASK: np.ascontiguousarray(named[specs.TEXT_MASK][:p]),
            specs.KEPT_QUERIES: np.ascontiguousarray(ranked[:p, :j]),
        })
        cases.append(VerifyCase(f"{label}, P={p}, J={j}", 0, inputs))
    return cases


def check_plan(trt, model: str, ranges: list[ProfileRange], path: TensorRTPath, blob: bytes,
               checker: PlanChecker, logger, queries: ProfileRange | None = None) -> dict:
    """Load `blob` (a serialized plan of `model`) and compare it with the reference."""
    from dart_triton.export.tensorrt.executor import PlanExecutor

    with tensorrt_step(f"loading the {model} plan for verification", path):
        runner = PlanExecutor(blob, trt, logger)

    def run_plan(inputs, profile: int = 0) -> dict:
        with tensorrt_step(f"running the {model} plan (profile {profile})", path):
            return runner(inputs, profile)

    try:
        return checker.verify(model, ranges, run_plan, queries)
    finally:
        runner.close()

