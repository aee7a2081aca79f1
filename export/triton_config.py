"""`config.pbtxt` text for every model, generated from `dart_triton.contract.specs` alone.

backbone and enc_dec keep their names and tensors across backends; what a backend
changes about them is in its entry of the backend table (`export.backends`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
from dart_triton.export.backends import get_backend

DEFAULT_INSTANCES = {
    # Two `dart` instances keep two frames in flight: one in the backbone while the
    # other is in the encoder-decoder (inter-frame pipelining, DART §3.5).
    specs.DART: 2,
    specs.PREPROCESS: 2,
    specs.TEXT_ENCODER: 1,  # one instance = one shared embedding cache
    specs.BACKBONE: 1,
    specs.ENC_DEC: 1,
    specs.POSTPROCESS: 2,
}


@dataclass
class RepoOptions:
    backend: str = "python"
    dims: GraphDims = field(default_factory=GraphDims)
    instances: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_INSTANCES))
    gpu: bool = False  # python models and graphs on the GPU (KIND_GPU)
    gpus: tuple[int, ...] = ()  # GPU ids; () = Triton's default (every visible GPU)
    enc_dec_buckets: tuple[int, ...] = ()  # N buckets dart pads to; () = chunks of max
    cuda_graphs: bool = True
    warm_vocabulary: str = "coco80.txt"
    ort_threads: int = 0  # python backend: ONNX Runtime threads per session (0 = all cores)
    # Graph-model parameters of backends that take any (torch: precision, compile mode,
    # CUDA graphs), from the build options by the backend's entry (`export.backends`).
    graph_settings: dict[str, str] = field(default_factory=dict)
    # What serves `backbone` (`BackboneChoice.describe`), said in dart's parameters.
    backbone: str = "vit"

    def __post_init__(self) -> None:
        self.gpus = tuple(self.gpus)
        if get_backend(self.backend).gpu_only or self.gpus:
            self.gpu = True


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
    later one, within a few such requests (`tests/test_triton_server.py`). A failure in the
    first step, with nothing else in flight, is answered cleanly. The cost is the
    text encoder waiting for the resize (the cache answers in microseconds; the
    backbone, not text, is the critical path).
    """
    d = opts.dims
    spec = specs.dart_spec(d, specs.DART_ENSEMBLE)
    same = lambda *names: {n: n for n in names}  # noqa: E731 - tensor names match end to end
    step = pbtxt.ensemble_step
    steps = [
        step(specs.PREPROCESS,
             same(specs.IMAGE, specs.IMAGE_BYTES, specs.CLASSES, specs.SCORE_THRESHOLD,
                  specs.NMS_IOU, specs.MAX_DETECTIONS),
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


def all_configs(opts: RepoOptions) -> dict[str, str]:
    """model name -> config.pbtxt text, for the whole repository."""
    d = opts.dims
    s = specs.all_specs(d)
    backend = get_backend(opts.backend)
    return {
        specs.PREPROCESS: python_model_config(
            s[specs.PREPROCESS], opts, PreprocessParameters(d.imgsz, d.max_classes)),
        specs.TEXT_ENCODER: python_model_config(
            s[specs.TEXT_ENCODER], opts, TextEncoderParameters(opts.warm_vocabulary)),
        **{name: backend.graph_config(s[name], opts) for name in specs.GRAPH_MODELS},
        specs.POSTPROCESS: python_model_config(s[specs.POSTPROCESS], opts,
                                               PostprocessParameters()),
        specs.DART: python_model_config(
            s[specs.DART], opts, DartParameters(d.imgsz, d.max_classes, opts.enc_dec_buckets,
                                                opts.backbone)),
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


def write_repository_files(repo, opts: RepoOptions) -> None:
    """Every config.pbtxt and python model entry point of a repository (no weights)."""
    from pathlib import Path

    repo = Path(repo)
    for name, text in all_configs(opts).items():
        (repo / name / "1").mkdir(parents=True, exist_ok=True)  # ensembles need a version dir
        (repo / name / "config.pbtxt").write_text(text)
    for name, module in get_backend(opts.backend).python_models().items():
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
