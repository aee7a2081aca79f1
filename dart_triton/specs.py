"""The one source of truth for tensor names, dtypes and shapes.

Every ONNX export, Triton ``config.pbtxt``, python model, client and test reads
tensor names and shapes from here. A shape entry of ``-1`` is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Triton data types (config.pbtxt spelling) and their numpy spellings.
NUMPY_DTYPE = {
    "TYPE_UINT8": "uint8",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_FP32": "float32",
    "TYPE_BOOL": "bool",
    "TYPE_STRING": "object",
}

PATCH_SIZE = 14
DEFAULT_IMGSZ = 1008
DEFAULT_MAX_CLASSES = 16
MAX_REQUEST_CLASSES = 1024
# Largest accepted input image, in pixels per side (an 8K frame fits; 16384² RGB is 768 MiB).
MAX_IMAGE_SIDE = 8192

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.7
DEFAULT_MAX_DETECTIONS = 100


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton spelling, e.g. "TYPE_FP32"
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def numpy_dtype(self) -> str:
        return NUMPY_DTYPE[self.dtype]

    @property
    def triton_dtype(self) -> str:
        """tritonclient spelling ("FP32", "BYTES", ...)."""
        short = self.dtype.removeprefix("TYPE_")
        return "BYTES" if short == "STRING" else short


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class GraphDims:
    """Sizes fixed when a repository is built (from the checkpoint and build flags)."""

    imgsz: int = DEFAULT_IMGSZ
    fpn_dim: int = 256  # channels of the FPN features the detector reads
    text_len: int = 32  # tokens per prompt (CLIP context length)
    text_dim: int = 256  # projected text feature width (= DETR hidden size)
    num_queries: int = 200
    max_classes: int = DEFAULT_MAX_CLASSES
    with_mask_levels: bool = False  # backbone also returns the two finer FPN levels
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def feat_hw(self) -> int:
        return self.imgsz // PATCH_SIZE


# Model names: the only place they are spelled out --------------------------------
PREPROCESS = "preprocess"
TEXT_ENCODER = "text_encoder"
BACKBONE = "backbone"
ENC_DEC = "enc_dec"
POSTPROCESS = "postprocess"
DART = "dart"  # the public BLS model
DART_ENSEMBLE = "dart_ensemble"  # the same contract as a pure Triton ensemble
GRAPH_MODELS = (BACKBONE, ENC_DEC)  # the two exported graphs (ONNX / plans / torch)

# Tensor names shared across models ------------------------------------------------
IMAGE = "IMAGE"
CLASSES = "CLASSES"
SCORE_THRESHOLD = "SCORE_THRESHOLD"
NMS_IOU = "NMS_IOU"
MAX_DETECTIONS = "MAX_DETECTIONS"
BOXES = "BOXES"
SCORES = "SCORES"
CLASS_IDS = "CLASS_IDS"

PIXEL_VALUES = "pixel_values"
ORIGINAL_SIZE = "original_size"
CHECKED_CLASSES = "checked_classes"  # CLASSES after preprocess validated them (ensemble)
FPN_FEATURES = "fpn_features"  # the 1x level (imgsz/14): the only one detection reads
FPN_FEATURES_4X = "fpn_features_4x"  # mask head only
FPN_FEATURES_2X = "fpn_features_2x"  # mask head only
TEXT_FEATURES = "text_features"
TEXT_MASK = "text_mask"
PRED_BOXES = "pred_boxes"  # [N, Q, 4] xyxy, normalised to [0, 1]
PRED_LOGITS = "pred_logits"  # [N, Q]
PRESENCE_LOGITS = "presence_logits"  # [N, 1]
HEAD_OUTPUTS = (PRED_BOXES, PRED_LOGITS, PRESENCE_LOGITS)  # enc_dec's outputs, in order
DETECTION_OUTPUTS = (BOXES, SCORES, CLASS_IDS)  # dart's outputs, in order


def backbone_spec(d: GraphDims) -> ModelSpec:
    s, h = d.imgsz, d.feat_hw
    outputs = [TensorSpec(FPN_FEATURES, "TYPE_FP32", (1, d.fpn_dim, h, h))]
    if d.with_mask_levels:
        outputs += [
            TensorSpec(FPN_FEATURES_4X, "TYPE_FP32", (1, d.fpn_dim, 4 * h, 4 * h)),
            TensorSpec(FPN_FEATURES_2X, "TYPE_FP32", (1, d.fpn_dim, 2 * h, 2 * h)),
        ]
    return ModelSpec(
        BACKBONE,
        (TensorSpec(PIXEL_VALUES, "TYPE_FP32", (1, 3, s, s)),),
        tuple(outputs),
    )


def enc_dec_spec(d: GraphDims) -> ModelSpec:
    h = d.feat_hw
    return ModelSpec(
        ENC_DEC,
        (
            TensorSpec(FPN_FEATURES, "TYPE_FP32", (1, d.fpn_dim, h, h)),
            TensorSpec(TEXT_FEATURES, "TYPE_FP32", (-1, d.text_len, d.text_dim)),
            TensorSpec(TEXT_MASK, "TYPE_INT32", (-1, d.text_len)),
        ),
        (
            TensorSpec(PRED_BOXES, "TYPE_FP32", (-1, d.num_queries, 4)),
            TensorSpec(PRED_LOGITS, "TYPE_FP32", (-1, d.num_queries)),
            TensorSpec(PRESENCE_LOGITS, "TYPE_FP32", (-1, 1)),
        ),
    )


def preprocess_spec(d: GraphDims) -> ModelSpec:
    """IMAGE -> pixels; also the ensemble's gate: it checks the whole request up front.

    Given CLASSES (and the options), preprocess validates them too and hands the class
    names on as CHECKED_CLASSES, so in `dart_ensemble` a bad request fails in this first
    step while no other step is in flight (see `export.triton_config.ensemble_config`).
    """
    s = d.imgsz
    return ModelSpec(
        PREPROCESS,
        (
            TensorSpec(IMAGE, "TYPE_UINT8", (-1, -1, 3)),
            TensorSpec(CLASSES, "TYPE_STRING", (-1,), optional=True),
            *_request_options(),
        ),
        (
            TensorSpec(PIXEL_VALUES, "TYPE_FP32", (1, 3, s, s)),
            TensorSpec(ORIGINAL_SIZE, "TYPE_INT32", (2,)),
            TensorSpec(CHECKED_CLASSES, "TYPE_STRING", (-1,)),
        ),
    )


def text_encoder_spec(d: GraphDims) -> ModelSpec:
    return ModelSpec(
        TEXT_ENCODER,
        (TensorSpec(CLASSES, "TYPE_STRING", (-1,)),),
        (
            TensorSpec(TEXT_FEATURES, "TYPE_FP32", (-1, d.text_len, d.text_dim)),
            TensorSpec(TEXT_MASK, "TYPE_INT32", (-1, d.text_len)),
        ),
    )


def _request_options() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(SCORE_THRESHOLD, "TYPE_FP32", (1,), optional=True),
        TensorSpec(NMS_IOU, "TYPE_FP32", (1,), optional=True),
        TensorSpec(MAX_DETECTIONS, "TYPE_INT32", (1,), optional=True),
    )


def _detections() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(BOXES, "TYPE_FP32", (-1, 4)),
        TensorSpec(SCORES, "TYPE_FP32", (-1,)),
        TensorSpec(CLASS_IDS, "TYPE_INT32", (-1,)),
    )


def postprocess_spec(d: GraphDims) -> ModelSpec:
    enc_dec = enc_dec_spec(d)
    return ModelSpec(
        POSTPROCESS,
        (*enc_dec.outputs, TensorSpec(ORIGINAL_SIZE, "TYPE_INT32", (2,)), *_request_options()),
        _detections(),
    )


def dart_spec(d: GraphDims, name: str = DART) -> ModelSpec:
    """The public contract, shared by the BLS model ``dart`` and ``dart_ensemble``."""
    return ModelSpec(
        name,
        (
            TensorSpec(IMAGE, "TYPE_UINT8", (-1, -1, 3)),
            TensorSpec(CLASSES, "TYPE_STRING", (-1,)),
            *_request_options(),
        ),
        _detections(),
    )


def all_specs(d: GraphDims) -> dict[str, ModelSpec]:
    specs = [
        preprocess_spec(d),
        text_encoder_spec(d),
        backbone_spec(d),
        enc_dec_spec(d),
        postprocess_spec(d),
        dart_spec(d, DART),
        dart_spec(d, DART_ENSEMBLE),
    ]
    return {s.name: s for s in specs}
