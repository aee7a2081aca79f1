"""Check a built plan against the FP32 ONNX graph it came from.

FP16 TensorRT can be silently wrong: when attention is not matched to a fused kernel the
ViT-H backbone's features degrade to cosine 0.058 (paper §3.3, Table 4), yet the engine
builds and runs. So every build runs each plan on sample inputs, compares with FP32 ONNX
Runtime, and refuses to install a plan that misses these bars:

* FPN features (every backbone output): cosine >= 0.999, the paper's "correct" bar;
* ``pred_logits`` / ``presence_logits``: cosine >= 0.999;
* ``pred_boxes``: max |diff| <= 0.02 in normalised xyxy units (2 % of the image side,
  ~20 px at 1008: well inside what NMS at IoU 0.7 and COCO AP tolerate).

A cosine over fewer than 8 values says little (over one value it is just the sign), so
such tensors (``presence_logits`` at N=1) are held to max |diff| <= 1 % of max(1, |ref|).

The plan runner is passed in as a callable, so this module needs neither TensorRT nor a
GPU and is tested on CPU with ONNX Runtime standing in for the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dart_triton import specs
from dart_triton.buckets import ProfileRange

Arrays = Mapping[str, np.ndarray]
Runner = Callable[[Arrays, int], dict[str, np.ndarray]]  # (inputs, profile) -> outputs

SMALL = 8  # fewer values than this: no cosine


class VerificationError(RuntimeError):
    """A plan's outputs are too far from FP32 ONNX Runtime."""


@dataclass(frozen=True)
class Tolerances:
    min_cosine: float = 0.999
    max_abs_boxes: float = 2e-2
    small_rel: float = 1e-2

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyCase:
    label: str
    profile: int
    inputs: dict[str, np.ndarray]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened tensors, in float64."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff.max()) if diff.size else 0.0


def _hint(model: str) -> str:
    if model == specs.BACKBONE:
        return (" Likely FP16 attention fell back to generic MatMuls (paper §3.3): export with "
                "explicit attention and real-valued RoPE, or build with --precision fp32.")
    return " Try --precision fp32 to tell an FP16 problem from an export problem."


def compare_outputs(
    model: str,
    ref: Arrays,
    got: Arrays,
    tol: Tolerances = Tolerances(),
    context: str = "",
) -> dict[str, dict[str, float]]:
    """Figures per tensor; raises VerificationError naming each tensor that misses its bar."""
    figures: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    for name, r in ref.items():
        if name not in got:
            failures.append(f"{name} missing from the plan outputs (has {sorted(got)})")
            continue
        g = np.asarray(got[name])
        r = np.asarray(r)
        if g.shape != r.shape:
            failures.append(f"{name} shape {list(g.shape)} != reference {list(r.shape)}")
            continue
        if not np.isfinite(g).all():
            failures.append(f"{name} has {int((~np.isfinite(g)).sum())} non-finite values")
            continue
        fig = {"cosine": cosine(r, g), "max_abs": max_abs(r, g)}
        figures[name] = fig
        if name == specs.PRED_BOXES:
            if fig["max_abs"] > tol.max_abs_boxes:
                failures.append(f"{name} max abs diff {fig['max_abs']:.4g} > "
                                f"{tol.max_abs_boxes:g} (normalised box units)")
        elif r.size < SMALL:
            limit = tol.small_rel * max(1.0, float(np.abs(r).max(initial=0.0)))
            if fig["max_abs"] > limit:
                failures.append(f"{name} max abs diff {fig['max_abs']:.4g} > {limit:.4g} "
                                f"({tol.small_rel:g} of max(1, |ref|); too few values "
                                "for a cosine)")
        elif fig["cosine"] < tol.min_cosine:
            failures.append(f"{name} cosine {fig['cosine']:.5f} < {tol.min_cosine:g}")
    if failures:
        where = f" ({context})" if context else ""
        raise VerificationError(
            f"{model} plan failed verification against FP32 ONNX Runtime{where}: "
            + "; ".join(failures) + "." + _hint(model)
        )
    return figures


def verify_plan(
    model: str,
    cases: Sequence[VerifyCase],
    reference: Runner,
    run_plan: Runner,
    tol: Tolerances = Tolerances(),
) -> dict:
    """Run every case through both; the worst figure per tensor goes to the sidecar."""
    worst: dict[str, dict[str, float]] = {}
    runs = []
    for case in cases:
        ref = reference(case.inputs, case.profile)
        got = run_plan(case.inputs, case.profile)
        figs = compare_outputs(model, ref, got, tol, f"{case.label}, profile {case.profile}")
        runs.append({"label": case.label, "profile": case.profile, "figures": figs})
        for name, f in figs.items():
            w = worst.setdefault(name, {"cosine": 1.0, "max_abs": 0.0})
            w["cosine"] = min(w["cosine"], f["cosine"])
            w["max_abs"] = max(w["max_abs"], f["max_abs"])
    return {"reference": "onnxruntime fp32", "tolerances": tol.as_dict(), "worst": worst,
            "runs": runs}


# Sample inputs ---------------------------------------------------------------------

def sample_pixels(imgsz: int, seed: int = 0) -> np.ndarray:
    """A blocky random RGB image normalised like SAM3 ((x/255 - 0.5) / 0.5), [1, 3, S, S]."""
    rng = np.random.default_rng(seed)
    cells = max(1, imgsz // 8)
    coarse = rng.integers(0, 256, (3, 8, 8)).astype(np.float32)
    img = np.kron(coarse, np.ones((cells, cells), np.float32))[:, :imgsz, :imgsz]
    img = np.pad(img, ((0, 0), (0, imgsz - img.shape[1]), (0, imgsz - img.shape[2])), "edge")
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).round()
    return ((img / 255.0 - 0.5) / 0.5).astype(np.float32)[None]


def sample_text(
    dims: specs.GraphDims, rows: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random ``[rows, L, D]`` text features and a prefix mask of 2..L valid tokens per row."""
    rng = np.random.default_rng(seed + 1)
    feats = rng.standard_normal((rows, dims.text_len, dims.text_dim)).astype(np.float32)
    lengths = rng.integers(min(2, dims.text_len), dims.text_len + 1, rows)
    mask = (np.arange(dims.text_len)[None] < lengths[:, None]).astype(np.int32)
    return feats, mask


def load_sample(path: str | Path | None) -> dict[str, np.ndarray]:
    """Optional real inputs (``.npz`` with any of pixel_values, text_features, text_mask)."""
    if path is None:
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def backbone_cases(dims: specs.GraphDims, sample: Arrays, seed: int = 0) -> list[VerifyCase]:
    pixels = sample.get(specs.PIXEL_VALUES)
    label = "sample pixels"
    if pixels is None:
        pixels, label = sample_pixels(dims.imgsz, seed), "random pixels"
    want = (1, 3, dims.imgsz, dims.imgsz)
    if tuple(pixels.shape) != want:
        raise ValueError(f"sample {specs.PIXEL_VALUES} is {list(pixels.shape)}, need {list(want)}")
    return [VerifyCase(label, 0, {specs.PIXEL_VALUES: pixels.astype(np.float32)})]


def enc_dec_cases(
    dims: specs.GraphDims,
    ranges: Sequence[ProfileRange],
    fpn_features: np.ndarray,
    sample: Arrays,
    seed: int = 0,
) -> list[VerifyCase]:
    """Per profile, N at its min, opt and max (the padded bucket size is the opt)."""
    top = max(r.max for r in ranges)
    if specs.TEXT_FEATURES in sample and specs.TEXT_MASK in sample:
        have = sample[specs.TEXT_FEATURES].shape[0]
        rows = np.arange(top) % have  # reuse real prompts cyclically up to max N
        feats = sample[specs.TEXT_FEATURES][rows].astype(np.float32)
        mask = sample[specs.TEXT_MASK][rows].astype(np.int32)
        label = "sample text"
    else:
        feats, mask = sample_text(dims, top, seed)
        label = "random text"
    cases = []
    for i, r in enumerate(ranges):
        for n in sorted({r.min, r.opt, r.max}):
            inputs = {specs.FPN_FEATURES: fpn_features.astype(np.float32),
                      specs.TEXT_FEATURES: np.ascontiguousarray(feats[:n]),
                      specs.TEXT_MASK: np.ascontiguousarray(mask[:n])}
            cases.append(VerifyCase(f"{label}, N={n}", i, inputs))
    return cases


def onnx_reference(onnx_path: str | Path) -> Runner:
    """FP32 ONNX Runtime on the exported graph (CUDA with TF32 off when present, else CPU)."""
    import onnxruntime as ort

    providers: list = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(inputs: Arrays, profile: int = 0) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in inputs.items() if k in wanted}
        return dict(zip(names, session.run(names, feed), strict=True))

    return run
