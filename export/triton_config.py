"""`config.pbtxt` text for every model, generated from `dart_triton.contract.specs` alone.

backbone and enc_dec keep their names and tensors across backends; what a backend
changes about them is in its entry of the backend table (`export.backends`).
"""

from __future__ import annotations

from dart_triton.contract import specs
from dart_triton.contract.parameters import (
    DartParameters,
    ModelParameters,
    PostprocessParameters,
    PreprocessParameters,
    TextEncoderParameters,
)
from dart_triton.contract.specs import GraphDims, ModelSpec
from dart_triton.export import pbtxt
from dart_triton.export.backends import Backend, get_backend
from dart_triton.export.options import RepoOptions


def python_model_config(spec: ModelSpec, opts: RepoOptions, params: ModelParameters) -> str:
    text = pbtxt.header(spec.name, "backend: \"python\"\n") + pbtxt.io(spec)
    text += pbtxt.instances(opts.instances[spec.name], opts.gpu, gpus=opts.gpus)
    # On a GPU, tensors reach the python model as they are (DLPack), not via host memory.
    return text + pbtxt.params(params.to_strings(gpu_inputs=opts.gpu))


def ensemble_config(opts: RepoOptions) -> str:
    """dart_ensemble: preprocess -> backbone ∥ text_encoder -> enc_dec -> postprocess.

    preprocess is the gate: it checks IMAGE, CLASSES and the options, and text_encoder
    reads the checked names from it. Running preprocess and text_encoder side by side
    wedged tritonserver 2.51: a zero-byte IMAGE (0xW) failing in preprocess while
    text_encoder was in flight left the ensemble hanging, for that request and every
    later one, within a few such requests (`tests/server/test_dart_parity.py`). A failure in the
    first step, with nothing else in flight, is answered cleanly. The cost is the
    text encoder waiting for the resize (the cache answers in microseconds; the
    backbone, not text, is the critical path).
    """
    d = opts.dims
    spec = specs.dart_spec(d, specs.DART_ENSEMBLE)
    # With shared passes, text_encoder's rows already come as the one item enc_dec takes,
    # and postprocess takes enc_dec's outputs as they come (`specs.as_item`).
    same = lambda *names: {n: n for n in names}  # noqa: E731 - tensor names match end to end
    step = pbtxt.ensemble_step
    steps = [
        step(specs.PREPROCESS,
             same(specs.IMAGE, specs.IMAGE_BYTES, specs.CLASSES, specs.SCORE_THRESHOLD,
                  specs.NMS_IOU, specs.MAX_DETECTIONS, specs.RETURN_MASKS, specs.MASK_THRESHOLD),
             same(specs.PIXEL_VALUES, specs.ORIGINAL_SIZE, specs.CHECKED_CLASSES)),
        step(specs.TEXT_ENCODER, {specs.CLASSES: specs.CHECKED_CLASSES},
             same(specs.TEXT_FEATURES, specs.TEXT_MASK)),
        step(specs.BACKBONE, same(specs.PIXEL_VALUES), same(specs.FPN_FEATURES)),
        step(specs.ENC_DEC, same(specs.FPN_FEATURES, specs.TEXT_FEATURES, specs.TEXT_MASK),
             same(*specs.HEAD_OUTPUTS)),
        step(specs.POSTPROCESS,
             same(*specs.HEAD_OUTPUTS, specs.ORIGINAL_SIZE, specs.SCORE_THRESHOLD,
                  specs.NMS_IOU, specs.MAX_DETECTIONS),
             same(*specs.DETECTION_OUTPUTS)),
    ]
    return (pbtxt.header(spec.name, "platform: \"ensemble\"\n") + pbtxt.io(spec)
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def all_configs(opts: RepoOptions, backend: Backend | None = None) -> dict[str, str]:
    """model name -> config.pbtxt text, for the whole repository (`backend`: the entry of
    `opts.backend`, when the caller has looked it up already)."""
    backend = backend or get_backend(opts.backend)
    opts = backend.configure(opts)
    d = opts.dims
    s = specs.all_specs(d, opts.shared_passes)
    return {
        specs.PREPROCESS: python_model_config(
            s[specs.PREPROCESS], opts, PreprocessParameters(d.imgsz, d.max_classes)),
        specs.TEXT_ENCODER: python_model_config(
            s[specs.TEXT_ENCODER], opts, TextEncoderParameters(opts.warm_vocabulary)),
        **{name: backend.graph_config(s[name], opts) for name in specs.graph_models(d)},
        specs.POSTPROCESS: python_model_config(s[specs.POSTPROCESS], opts,
                                               PostprocessParameters()),
        specs.DART: python_model_config(
            s[specs.DART], opts, DartParameters(
                d.imgsz, d.max_classes, opts.enc_dec_buckets, opts.backbone, d.masks,
                ",".join(t.name for t in s[specs.MASK_DECODER].inputs
                         if t.name.startswith(specs.FPN_FEATURES)) if d.masks else "",
                opts.shared_passes, opts.max_batch if opts.shared_passes else 0)),
        specs.DART_ENSEMBLE: ensemble_config(opts),
    }


def python_model_entry(module: str) -> str:
    """A python model's `model.py`: the logic lives in the installed package.

    The python backend's stub puts tritonserver's working directory first on sys.path, so
    a folder named dart_triton there (a source checkout) would shadow the installed
    package: the entry point takes that directory off the path before importing."""
    return (f'"""Generated by `dart-triton build`; the model is {module}."""\n\n'
            "import os\nimport sys\n\n"
            "# The stub puts its working directory on sys.path: import the installed package.\n"
            "_cwd = os.getcwd()\n"
            "sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _cwd]\n\n"
            f"from {module} import TritonPythonModel  # noqa: E402\n\n"
            '__all__ = ["TritonPythonModel"]\n')


def write_repository_files(repo, opts: RepoOptions, backend: Backend | None = None) -> None:
    """Every config.pbtxt and python model entry point of a repository (no weights)."""
    from pathlib import Path

    repo = Path(repo)
    backend = backend or get_backend(opts.backend)
    for name, text in all_configs(opts, backend).items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version dir
        (repo / name / "config.pbtxt").write_text(text)
    for name, module in backend.python_models(opts.dims).items():
        (repo / name / "1" / "model.py").write_text(python_model_entry(module))


def reference_options() -> RepoOptions:
    """The deployment the committed `model_repository/*/config.pbtxt` files describe:
    real SAM3 sizes at 1008 px, 16 prompts per pass, TensorRT plans with N buckets."""
    return RepoOptions(backend="tensorrt", dims=GraphDims(), enc_dec_buckets=(1, 4, 16))


def main(argv: list[str] | None = None) -> int:
    """Regenerate the committed reference repository: python -m dart_triton.export.triton_config"""
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    checkout = Path(__file__).resolve().parent.parent  # the source tree, when run from one
    if not args and not (checkout / "pyproject.toml").is_file():
        print("usage: python -m dart_triton.export.triton_config OUT_DIR (installed: name the "
              "directory to write)", file=sys.stderr)
        return 2
    repo = Path(args[0] if args else checkout / "model_repository")
    write_repository_files(repo, reference_options())
    print(f"wrote reference configs into {repo}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
