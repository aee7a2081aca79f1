"""Check a built plan against an FP32 reference on real inputs.

FP16 TensorRT can be silently wrong: when attention is not matched to a fused kernel the
ViT-H backbone's features degrade to cosine 0.058 (paper §3.3, Table 4), yet the engine
builds and runs. Random pixels and Gaussian text features can hide an FP16 overflow that
real activations trigger, so every build runs each plan on real inputs by default:

* a real photograph shipped with the package (``dart_triton/assets/verify_astronaut.jpg``:
  scikit-image's ``astronaut`` sample, a NASA photograph of Eileen Collins, public
  domain), preprocessed exactly as served;
* the text features of real class names (the packaged COCO names), from the repository's
  text encoder, else the checkpoint's; Gaussian features only when neither is reachable,
  and then the sidecar says so;

compares the plan's outputs with an FP32 reference (the restructured PyTorch modules on
the GPU when torch sees one and the checkpoint is reachable, TF32 off; ONNX Runtime on the
CPU otherwise), and refuses to install a plan that misses these bars:

* FPN features (every backbone output): cosine >= 0.999, the paper's "correct" bar;
* ``pred_logits`` / ``presence_logits``: cosine >= 0.999;
* ``pred_boxes``: max |diff| <= 0.02 in normalised xyxy units (2 % of the image side,
  ~20 px at 1008: well inside what NMS at IoU 0.7 and COCO AP tolerate);
* everything else (with ``--masks``: enc_dec's ``encoder_memory`` and ``decoder_queries``,
  mask_decoder's ``mask_logits``): cosine >= 0.999.

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

from dart_triton.contract import specs
from dart_triton.contract.passes import ProfileRange

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
            f"{model} plan failed verification against the FP32 reference{where}: "
            + "; ".join(failures) + "." + _hint(model)
        )
    return figures


def verify_plan(
    model: str,
    cases: Sequence[VerifyCase],
    reference: Runner,
    run_plan: Runner,
    tol: Tolerances = Tolerances(),
    reference_name: str = "onnxruntime cpu fp32",
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
    return {"reference": reference_name, "tolerances": tol.as_dict(), "worst": worst,
            "runs": runs}


# Real inputs ---------------------------------------------------------------------------

VERIFY_PHOTO = "verify_astronaut.jpg"
VOCABULARY = "coco80.txt"


@dataclass(frozen=True)
class TextSample:
    features: np.ndarray  # FP32 [rows, L, D]
    mask: np.ndarray  # INT32 [rows, L]
    label: str  # where the features came from (recorded in the sidecar)


def _asset(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("dart_triton") / "assets" / name))


def verify_photo() -> np.ndarray:
    """The packaged photograph, UINT8 [H, W, 3] RGB."""
    from PIL import Image

    with Image.open(_asset(VERIFY_PHOTO)) as im:
        return np.asarray(im.convert("RGB"))


def photo_pixels(imgsz: int) -> np.ndarray:
    """The photograph as served: ``pixel_values`` FP32 [1, 3, S, S] (`model.preprocess`)."""
    from dart_triton.model.preprocess import preprocess

    return preprocess(verify_photo(), imgsz)[0]


def verify_classes(rows: int) -> list[str]:
    """``rows`` real class names: the packaged COCO vocabulary, reused cyclically."""
    names = [n.strip() for n in _asset(VOCABULARY).read_text().splitlines() if n.strip()]
    return [names[i % len(names)] for i in range(rows)]


def random_text(dims: specs.GraphDims, rows: int, seed: int = 0) -> TextSample:
    """Gaussian ``[rows, L, D]`` features, a prefix mask of 2..L tokens: the last resort."""
    rng = np.random.default_rng(seed + 1)
    feats = rng.standard_normal((rows, dims.text_len, dims.text_dim)).astype(np.float32)
    lengths = rng.integers(min(2, dims.text_len), dims.text_len + 1, rows)
    mask = (np.arange(dims.text_len)[None] < lengths[:, None]).astype(np.int32)
    return TextSample(feats, mask, "random text")


def text_encoder_dir(repo_dir: str | Path) -> Path:
    """Where `dart-triton build` saves the text encoder inside a repository."""
    return Path(repo_dir) / specs.TEXT_ENCODER / "1" / "text_encoder"


def real_text(dims: specs.GraphDims, rows: int, repo_dir: str | Path | None = None,
              checkpoint: str | Path | None = None, encoder=None, source: str = "",
              seed: int = 0) -> TextSample:
    """Text features of ``rows`` real class names from the first text encoder found: the
    one given (``source`` says whose), the repository's, the checkpoint's; Gaussian
    features when none is."""
    names = verify_classes(rows)
    label = f"text features of {rows} COCO names ({names[0]}, ...)"
    if encoder is not None and source:
        label += f" from {source}"
    if encoder is None:
        from dart_triton.model.text_encoder import TextEncoder

        if repo_dir is not None and text_encoder_dir(repo_dir).is_dir():
            encoder = TextEncoder.from_pretrained(text_encoder_dir(repo_dir))
            label += f" from {text_encoder_dir(repo_dir)}"
        elif checkpoint is not None and Path(checkpoint).is_dir():
            encoder = TextEncoder.from_checkpoint(checkpoint)
            label += f" from the checkpoint {checkpoint}"
    if encoder is None:
        sample = random_text(dims, rows, seed)
        return TextSample(sample.features, sample.mask,
                          "random text (no text encoder reachable: no repository text "
                          "encoder, no checkpoint; pass --sample for real inputs)")
    feats, mask = encoder.encode(names)
    want = (rows, dims.text_len, dims.text_dim)
    if feats.shape != want:
        raise ValueError(f"the text encoder gives features {list(feats.shape)}, the graphs "
                         f"take {list(want)}: it belongs to another checkpoint")
    return TextSample(feats.astype(np.float32), mask.astype(np.int32), label)


def load_sample(path: str | Path | None) -> dict[str, np.ndarray]:
    """Optional inputs of your own (``.npz`` with any of pixel_values, text_features,
    text_mask); they replace the photograph and the class names."""
    if path is None:
        return {}
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def backbone_cases(dims: specs.GraphDims, sample: Arrays, frames: int = 1
                   ) -> list[VerifyCase]:
    """The photo (or the sample's pixels); with ``frames`` > 1 also a batch of that many
    different frames (the photo shifted sideways by a different amount each), so a plan
    that mixed up or dropped frames fails."""
    pixels = sample.get(specs.PIXEL_VALUES)
    label = "sample pixels"
    if pixels is None:
        pixels, label = photo_pixels(dims.imgsz), f"photo {VERIFY_PHOTO}"
    want = (1, 3, dims.imgsz, dims.imgsz)
    if tuple(pixels.shape) != want:
        raise ValueError(f"sample {specs.PIXEL_VALUES} is {list(pixels.shape)}, need {list(want)}")
    pixels = pixels.astype(np.float32)
    cases = [VerifyCase(label, 0, {specs.PIXEL_VALUES: pixels})]
    if frames > 1:
        batch = np.concatenate([np.roll(pixels, k * dims.imgsz // frames, axis=-1)
                                for k in range(frames)])
        cases.append(VerifyCase(f"{label}, {frames} frames", 0, {specs.PIXEL_VALUES: batch}))
    return cases


def sample_text(sample: Arrays, top: int) -> TextSample | None:
    """The text of a ``--sample`` file, its rows reused cyclically up to ``top``."""
    if specs.TEXT_FEATURES not in sample or specs.TEXT_MASK not in sample:
        return None
    have = sample[specs.TEXT_FEATURES].shape[0]
    rows = np.arange(top) % have
    return TextSample(sample[specs.TEXT_FEATURES][rows].astype(np.float32),
                      sample[specs.TEXT_MASK][rows].astype(np.int32), "sample text")


def enc_dec_cases(
    ranges: Sequence[ProfileRange],
    fpn_features: np.ndarray,
    text: TextSample,
) -> list[VerifyCase]:
    """Per profile, N at its min, opt and max (the padded bucket size is the opt)."""
    top = max(r.max for r in ranges)
    if text.features.shape[0] < top:
        raise ValueError(f"{text.label}: {text.features.shape[0]} rows, need {top}")
    cases = []
    for i, r in enumerate(ranges):
        for n in sorted({r.min, r.opt, r.max}):
            inputs = {specs.FPN_FEATURES: fpn_features.astype(np.float32),
                      specs.TEXT_FEATURES: np.ascontiguousarray(text.features[:n]),
                      specs.TEXT_MASK: np.ascontiguousarray(text.mask[:n])}
            cases.append(VerifyCase(f"{text.label.split(' (')[0]}, N={n}", i, inputs))
    return cases


# FP32 references -----------------------------------------------------------------------


class Reference:
    """FP32 outputs of a graph model: ``reference.run(model, inputs) -> {name: array}``."""

    name = "reference"

    def run(self, model: str, inputs: Arrays) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def runner(self, model: str) -> Runner:
        return lambda inputs, profile=0: self.run(model, inputs)


class OnnxCpuReference(Reference):
    """The exported FP32 graphs in ONNX Runtime on the CPU (sessions made on first use)."""

    name = "onnxruntime cpu fp32"

    def __init__(self, graphs: Mapping[str, Path]) -> None:
        self.graphs = dict(graphs)
        self._runs: dict[str, Runner] = {}

    def run(self, model: str, inputs: Arrays) -> dict[str, np.ndarray]:
        if model not in self._runs:
            self._runs[model] = onnx_reference(self.graphs[model])
        return self._runs[model](inputs, 0)


class TorchCudaReference(Reference):
    """The restructured PyTorch modules (what the graphs were exported from) on the GPU in
    FP32 with TF32 off: the reference without a slow CPU pass over a ViT-H."""

    name = "torch cuda fp32 (restructured modules)"

    def __init__(self, parts, device: str = "cuda") -> None:
        self.parts, self.device = parts, device
        self.modules = {specs.BACKBONE: parts.backbone, specs.ENC_DEC: parts.head}
        self.specs = {specs.BACKBONE: specs.backbone_spec(parts.dims),
                      specs.ENC_DEC: specs.enc_dec_spec(parts.dims)}
        if parts.mask_head is not None:  # the checkpoint's, loaded with masks
            self.modules[specs.MASK_DECODER] = parts.mask_head
            self.specs[specs.MASK_DECODER] = specs.mask_decoder_spec(parts.dims)
        self.modules = {m: module.to(device).float().eval() for m, module in self.modules.items()}

    def run(self, model: str, inputs: Arrays) -> dict[str, np.ndarray]:
        import torch

        spec, module = self.specs[model], self.modules[model]
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])).to(self.device)
                for t in spec.inputs]
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                outs = module(*args)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        if isinstance(outs, torch.Tensor):  # one output (mask_decoder): not a tuple to unpack
            outs = (outs,)
        return {t.name: o.float().cpu().numpy() for t, o in zip(spec.outputs, outs, strict=True)}


def pick_reference(graphs: Mapping[str, Path], dims: specs.GraphDims,
                   checkpoint: str | Path | None, backbone: str = "vit",
                   log: Callable[[str], None] = print) -> Reference:
    """The restructured modules on the GPU when torch sees one and the checkpoint the
    graphs were exported from is here; ONNX Runtime on the CPU otherwise."""
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if gpu and checkpoint is not None and Path(checkpoint).is_dir():
        from dart_triton.model.parts import load_parts

        parts = load_parts(checkpoint, dims.imgsz, dims.max_classes, dims.masks)
        if backbone != "vit":
            from dart_triton.backbones.choice import with_backbone

            parts = with_backbone(parts, backbone)
        return TorchCudaReference(parts)
    why = "no CUDA device for torch" if not gpu else f"checkpoint {checkpoint} not found"
    log(f"[build-plans] FP32 reference: ONNX Runtime on the CPU ({why})")
    return OnnxCpuReference(graphs)


def onnx_reference(onnx_path: str | Path) -> Runner:
    """FP32 ONNX Runtime on the CPU for one exported graph."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}

    def run(inputs: Arrays, profile: int = 0) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in inputs.items() if k in wanted}
        return dict(zip(names, session.run(names, feed), strict=True))

    return run
