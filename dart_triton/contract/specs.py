"""The one source of truth for tensor names, dtypes and shapes.

Every ONNX export, Triton ``config.pbtxt``, python model, client and test reads
tensor names and shapes from here. A shape entry of ``-1`` is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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
# Sam3VisionConfig's default FPN scales (4x, 2x, 1x, 0.5x of the ViT's imgsz/14 grid).
SAM3_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)
DEFAULT_IMGSZ = 1008
DEFAULT_MAX_CLASSES = 16
MAX_REQUEST_CLASSES = 1024
# Largest accepted input image, in pixels per side (an 8K frame fits; 16384² RGB is 768 MiB).
MAX_IMAGE_SIDE = 8192
# Largest image file accepted as IMAGE_BYTES (an 8192 x 8192 JPEG at quality 100 is ~40 MB).
MAX_IMAGE_FILE_BYTES = 64 << 20
# Longest class name accepted, in UTF-8 bytes. SAM3 reads 32 CLIP tokens per prompt (start,
# at most 30 name tokens, end) and the longest token in CLIP's BPE vocabulary is 32 bytes, so
# a name that fits holds at most 30 x 32 = 960 bytes; 1024 (32 tokens x 32 bytes) leaves a
# margin. A longer name would be truncated anyway (whitespace runs aside: the tokenizer
# collapses them). Refusing it up front keeps megabyte names out of the tokenizer (~1 s per
# MB on a CPU) and out of the text cache.
MAX_CLASS_NAME_BYTES = 1024

# Pre-NMS candidate caps (`postprocess.nms`); NMS_IOU 1.0 (no NMS) sorts all and skips them.
# In greedy NMS a box's fate depends only on the better-scored boxes of its group, so NMS over
# the best-scored candidates returns exactly the start of what uncapped NMS returns.
# Overall: SCORE_THRESHOLD 0 over 1024 classes x 200 queries is 204,800 boxes; 10,000 is
# 100x the default MAX_DETECTIONS and bounds one request's NMS work. It can only shorten
# the answer, and only if NMS suppresses more than 10,000 - MAX_DETECTIONS of the best boxes.
PRE_NMS_TOPK = 10_000
# Per NMS group (a class; the whole image in class-agnostic NMS): bounds a group's IoU matrix
# to 1000 x 1000. 5x SAM3's 200 queries, so it never binds in SAM3's per-class NMS; in
# class-agnostic NMS it acts as the overall cap (again only shortening the answer).
PRE_NMS_TOPK_PER_GROUP = 1_000

# Triton's default ports (`tritonserver`, `dart-triton serve`, the clients' default URLs).
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}

DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_NMS_IOU = 0.7
DEFAULT_MAX_DETECTIONS = 100
DEFAULT_MASK_THRESHOLD = 0.5  # Sam3Processor.post_process_instance_segmentation's default
# Mask pixels one block of masks may hold while it is resized to the image and encoded:
# 2^24 bytes of booleans (16 MiB) and 4x that of FP32 during the resize. An 8192 x 8192
# image is 4x this, so its masks go one at a time, in rows of 2048 (`model.masks`).
MASK_BLOCK_PIXELS = 1 << 24


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton spelling, e.g. "TYPE_FP32"
    dims: tuple[int, ...]
    optional: bool = False
    # The shape the model itself sees, where it differs from `dims` (Triton's `reshape`):
    # `as_item` declares [1, n, ...] to callers for a model that reads and writes [n, ...].
    reshape: tuple[int, ...] | None = None

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
    """Sizes fixed when a repository is built (from the checkpoint and build flags).

    Where detection reads its features is the checkpoint's, not an assumption: the vision
    neck has one FPN level per `scale_factors` entry, and `Sam3Model` feeds the DETR
    encoder-decoder the last level it keeps (``fpn_hidden_states[:-1][-1]``), i.e. neck
    index ``len(scale_factors) - 2``, at stride ``PATCH_SIZE / scale``. SAM3's default
    scales put it at scale 1 (imgsz / 14); other valid configs do not.
    """

    imgsz: int = DEFAULT_IMGSZ
    fpn_dim: int = 256  # channels of the FPN features the detector reads
    text_len: int = 32  # tokens per prompt (CLIP context length)
    text_dim: int = 256  # projected text feature width (= DETR hidden size)
    num_queries: int = 200
    max_classes: int = DEFAULT_MAX_CLASSES
    # built with --masks: backbone also returns the finer FPN levels the mask head reads
    # (the neck levels before the detection level, if any), enc_dec also hands over what
    # the mask head needs, and a `mask_decoder` graph is served
    masks: bool = False
    scale_factors: tuple[float, ...] = SAM3_SCALE_FACTORS  # vision_config.scale_factors

    def __post_init__(self):
        scales = tuple(float(s) for s in self.scale_factors)  # JSON gives a list
        if len(scales) < 2 or any(s <= 0 for s in scales):
            raise ValueError(f"scale_factors must hold at least two positive scales (SAM3 "
                             f"detects on the second to last), got {list(scales)}")
        object.__setattr__(self, "scale_factors", scales)
        object.__setattr__(self, "masks", bool(self.masks))

    @classmethod
    def from_dict(cls, recorded: dict) -> GraphDims:
        """From a recorded ``asdict`` (JSON); unknown keys are ignored. A record written
        before the scale factors were recorded gets SAM3's default scales: detection at
        imgsz / 14, as it was then."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in recorded.items() if k in names})

    @property
    def mask_levels(self) -> tuple[int, ...]:
        """Neck indices the mask head reads from the backbone, finest first (the detection
        level itself reaches it as encoder memory); () without masks."""
        return tuple(range(self.detection_level)) if self.masks else ()

    @property
    def mask_hw(self) -> int:
        """Side of the mask logits: the finest level the mask head reads."""
        levels = self.mask_levels
        return self.level_hw(self.scale_factors[levels[0]]) if levels else self.feat_hw

    @property
    def detection_level(self) -> int:
        """Index of the neck output the detector reads."""
        return len(self.scale_factors) - 2

    @property
    def detection_scale(self) -> float:
        return self.scale_factors[self.detection_level]

    @property
    def detection_stride(self) -> float:
        """Input pixels per detection feature (14 for SAM3's default scales)."""
        return PATCH_SIZE / self.detection_scale

    def level_hw(self, scale: float) -> int:
        """Side of the FPN level at `scale` (0.5 is a floor-mode 2x2 max-pool)."""
        return int(self.imgsz // PATCH_SIZE * scale)

    @property
    def feat_hw(self) -> int:
        """Side of the detection features: the enc-dec's grid, position encoding and RPB."""
        return self.level_hw(self.detection_scale)

    @property
    def backbone_levels(self) -> tuple[int, ...]:
        """Neck indices the backbone graph returns: detection first, then the mask levels."""
        return (self.detection_level, *self.mask_levels)

    def level_name(self, index: int) -> str:
        """Output name of neck level `index`: FPN_FEATURES for detection, else by scale."""
        if index == self.detection_level:
            return FPN_FEATURES
        scale = self.scale_factors[index]
        if self.scale_factors[: self.detection_level].count(scale) > 1:
            raise ValueError(f"scale_factors {list(self.scale_factors)} repeat {scale:g}: "
                             "the mask levels need distinct scales to be named")
        return f"{FPN_FEATURES}_{scale:g}x"


# Model names: the only place they are spelled out --------------------------------
PREPROCESS = "preprocess"
TEXT_ENCODER = "text_encoder"
BACKBONE = "backbone"
ENC_DEC = "enc_dec"
POSTPROCESS = "postprocess"
MASK_DECODER = "mask_decoder"  # only in a repository built with --masks
DART = "dart"  # the public BLS model
DART_ENSEMBLE = "dart_ensemble"  # the same contract as a pure Triton ensemble
GRAPH_MODELS = (BACKBONE, ENC_DEC)  # the two exported graphs (ONNX / plans / torch)
MASK_GRAPH_MODELS = (*GRAPH_MODELS, MASK_DECODER)  # ... and the third, with --masks

# Tensor names shared across models ------------------------------------------------
IMAGE = "IMAGE"
IMAGE_BYTES = "IMAGE_BYTES"  # the bytes of a JPEG, PNG or WebP file: instead of IMAGE
CLASSES = "CLASSES"
SCORE_THRESHOLD = "SCORE_THRESHOLD"
NMS_IOU = "NMS_IOU"
MAX_DETECTIONS = "MAX_DETECTIONS"
BOXES = "BOXES"
SCORES = "SCORES"
CLASS_IDS = "CLASS_IDS"
RETURN_MASKS = "RETURN_MASKS"  # BOOL [1]: `dart` also returns MASKS (default false)
MASK_THRESHOLD = "MASK_THRESHOLD"  # FP32 [1] in (0, 1): mask probability cut (default 0.5)
MASKS = "MASKS"  # BYTES [K]: COCO compressed-RLE counts per detection, at the image's size

PIXEL_VALUES = "pixel_values"
ORIGINAL_SIZE = "original_size"
CHECKED_CLASSES = "checked_classes"  # CLASSES after preprocess validated them (ensemble)
FPN_FEATURES = "fpn_features"  # the level detection reads (GraphDims.feat_hw per side)
FPN_FEATURES_4X = "fpn_features_4x"  # mask head only (GraphDims.level_name: by scale)
FPN_FEATURES_2X = "fpn_features_2x"  # mask head only
TEXT_FEATURES = "text_features"
TEXT_MASK = "text_mask"
PRED_BOXES = "pred_boxes"  # [N, Q, 4] xyxy, normalised to [0, 1]
PRED_LOGITS = "pred_logits"  # [N, Q]
PRESENCE_LOGITS = "presence_logits"  # [N, 1]
HEAD_OUTPUTS = (PRED_BOXES, PRED_LOGITS, PRESENCE_LOGITS)  # enc_dec's outputs, in order
# What enc_dec also hands the mask head (with --masks; requested only for masks):
ENCODER_MEMORY = "encoder_memory"  # [N, h*w, C] the encoder's image tokens, per prompt
DECODER_QUERIES = "decoder_queries"  # [N, Q, C] the last decoder layer's queries (normed)
MASK_INPUTS = (ENCODER_MEMORY, DECODER_QUERIES)
# mask_decoder's own tensors:
# [P, J, C] the decoder queries of the kept detections, prompt by prompt (rows of a prompt
# with fewer than J kept are padding: their masks are dropped)
KEPT_QUERIES = "kept_queries"
MASK_LOGITS = "mask_logits"  # [P, J, m, m] at the finest mask level (GraphDims.mask_hw)
# [N] INT64 row -> frame: an input of the enc_dec graph of a repository with shared passes
# (`shared_enc_dec_spec`), whose fpn_features then hold F frames. Never sent by callers: the
# graph model makes it when it packs the requests of a batch into one pass.
FRAME_INDEX = "frame_index"
DETECTION_OUTPUTS = (BOXES, SCORES, CLASS_IDS)  # dart's outputs, in order


def backbone_spec(d: GraphDims) -> ModelSpec:
    s = d.imgsz
    outputs = []
    for i in d.backbone_levels:  # detection level first, then the mask levels (if asked)
        h = d.level_hw(d.scale_factors[i])
        outputs.append(TensorSpec(d.level_name(i), "TYPE_FP32", (1, d.fpn_dim, h, h)))
    return ModelSpec(
        BACKBONE,
        (TensorSpec(PIXEL_VALUES, "TYPE_FP32", (1, 3, s, s)),),
        tuple(outputs),
    )


def enc_dec_spec(d: GraphDims, frames: bool = False) -> ModelSpec:
    """The enc_dec graph (ONNX, plans, torch module), and what an unbatched enc_dec model
    serves. With masks, it also returns `MASK_INPUTS`; `dart` asks for them only when a
    request wants masks (a graph computes them anyway: they are its own intermediates).
    `frames`: the graph of shared passes: F frames' features and a FRAME_INDEX per row."""
    h = d.feat_hw
    shared = (TensorSpec(FRAME_INDEX, "TYPE_INT64", (-1,)),) if frames else ()
    mask_inputs = (
        TensorSpec(ENCODER_MEMORY, "TYPE_FP32", (-1, h * h, d.fpn_dim)),
        TensorSpec(DECODER_QUERIES, "TYPE_FP32", (-1, d.num_queries, d.fpn_dim)),
    ) if d.masks else ()
    return ModelSpec(
        ENC_DEC,
        (
            TensorSpec(FPN_FEATURES, "TYPE_FP32", (-1 if frames else 1, d.fpn_dim, h, h)),
            TensorSpec(TEXT_FEATURES, "TYPE_FP32", (-1, d.text_len, d.text_dim)),
            TensorSpec(TEXT_MASK, "TYPE_INT32", (-1, d.text_len)),
            *shared,
        ),
        (
            TensorSpec(PRED_BOXES, "TYPE_FP32", (-1, d.num_queries, 4)),
            TensorSpec(PRED_LOGITS, "TYPE_FP32", (-1, d.num_queries)),
            TensorSpec(PRESENCE_LOGITS, "TYPE_FP32", (-1, 1)),
            *mask_inputs,
        ),
    )


def as_item(t: TensorSpec, reshape: bool = True) -> TensorSpec:
    """`t`'s rows as one item, [1, n, ...]: the shape of prompt rows between the models of
    a repository with shared passes. `reshape`: the model itself still sees [n, ...]."""
    return TensorSpec(t.name, t.dtype, (1, *t.dims), t.optional, t.dims if reshape else None)


def shared_enc_dec_spec(d: GraphDims) -> ModelSpec:
    """enc_dec with shared passes (`--max-batch` on the python and torch backends): one
    request is one item of Triton's dynamic batcher, a frame and its prompts
    (fpn_features [1, C, h, w], text [1, n, L, D], outputs [1, n, ...]); the model packs
    the items of a batch into passes whose rows come from several frames."""
    graph = enc_dec_spec(d)
    return ModelSpec(ENC_DEC, (graph.inputs[0], *(as_item(t, False) for t in graph.inputs[1:])),
                     tuple(as_item(t, False) for t in graph.outputs))


def mask_decoder_spec(d: GraphDims) -> ModelSpec:
    """Masks of the kept detections of P prompts, J per prompt (SAM3's mask head).

    Per prompt: the encoder memory attends to the prompt's text, replaces the detection
    level, and the pixel decoder climbs the finer backbone levels (the costly part:
    3x3 convolutions at 4x the detection grid); per kept query: its mask embedding dotted
    with its prompt's pixel embedding (one batched matmul). Only kept prompts and kept
    queries come in."""
    h = d.feat_hw
    levels = tuple(
        TensorSpec(d.level_name(i), "TYPE_FP32",
                   (1, d.fpn_dim, d.level_hw(d.scale_factors[i]), d.level_hw(d.scale_factors[i])))
        for i in d.mask_levels)
    m = d.mask_hw
    return ModelSpec(
        MASK_DECODER,
        (
            *levels,
            TensorSpec(ENCODER_MEMORY, "TYPE_FP32", (-1, h * h, d.fpn_dim)),
            TensorSpec(TEXT_FEATURES, "TYPE_FP32", (-1, d.text_len, d.text_dim)),
            TensorSpec(TEXT_MASK, "TYPE_INT32", (-1, d.text_len)),
            TensorSpec(KEPT_QUERIES, "TYPE_FP32", (-1, -1, d.fpn_dim)),
        ),
        (TensorSpec(MASK_LOGITS, "TYPE_FP32", (-1, -1, m, m)),),
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
            TensorSpec(IMAGE, "TYPE_UINT8", (-1, -1, 3), optional=True),
            TensorSpec(CLASSES, "TYPE_STRING", (-1,), optional=True),  # see dart_spec
            TensorSpec(IMAGE_BYTES, "TYPE_STRING", (1,), optional=True),
            *_request_options(),
            *_mask_options(),  # the ensemble's gate refuses RETURN_MASKS, naming `dart`
        ),
        (
            TensorSpec(PIXEL_VALUES, "TYPE_FP32", (1, 3, s, s)),
            TensorSpec(ORIGINAL_SIZE, "TYPE_INT32", (2,)),
            TensorSpec(CHECKED_CLASSES, "TYPE_STRING", (-1,)),
        ),
    )


def text_encoder_spec(d: GraphDims, shared_passes: bool = False) -> ModelSpec:
    """`shared_passes`: the rows go out as one item ([1, n, ...], `as_item`), the shape
    enc_dec takes them in (the ensemble passes them on as they are)."""
    item = as_item if shared_passes else (lambda t: t)
    return ModelSpec(
        TEXT_ENCODER,
        (TensorSpec(CLASSES, "TYPE_STRING", (-1,)),),
        (
            item(TensorSpec(TEXT_FEATURES, "TYPE_FP32", (-1, d.text_len, d.text_dim))),
            item(TensorSpec(TEXT_MASK, "TYPE_INT32", (-1, d.text_len))),
        ),
    )


def _request_options() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(SCORE_THRESHOLD, "TYPE_FP32", (1,), optional=True),
        TensorSpec(NMS_IOU, "TYPE_FP32", (1,), optional=True),
        TensorSpec(MAX_DETECTIONS, "TYPE_INT32", (1,), optional=True),
    )


def _mask_options() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(RETURN_MASKS, "TYPE_BOOL", (1,), optional=True),
        TensorSpec(MASK_THRESHOLD, "TYPE_FP32", (1,), optional=True),
    )


def _detections() -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(BOXES, "TYPE_FP32", (-1, 4)),
        TensorSpec(SCORES, "TYPE_FP32", (-1,)),
        TensorSpec(CLASS_IDS, "TYPE_INT32", (-1,)),
    )


def postprocess_spec(d: GraphDims, shared_passes: bool = False) -> ModelSpec:
    enc_dec = enc_dec_spec(d)
    item = as_item if shared_passes else (lambda t: t)
    return ModelSpec(
        POSTPROCESS,
        (*(item(enc_dec.output(n)) for n in HEAD_OUTPUTS),
         TensorSpec(ORIGINAL_SIZE, "TYPE_INT32", (2,)), *_request_options()),
        _detections(),
    )


def dart_spec(d: GraphDims, name: str = DART) -> ModelSpec:
    """The public contract, shared by the BLS model ``dart`` and ``dart_ensemble``.

    Both take RETURN_MASKS and MASK_THRESHOLD; only ``dart`` returns MASKS (``[0]`` when
    masks were not asked for). The ensemble stays boxes-only: its gate refuses
    RETURN_MASKS in one line naming ``dart``."""
    masks = (TensorSpec(MASKS, "TYPE_STRING", (-1,)),) if name == DART else ()
    return ModelSpec(
        name,
        (
            TensorSpec(IMAGE, "TYPE_UINT8", (-1, -1, 3), optional=True),  # or IMAGE_BYTES
            # Required, but declared optional to Triton: with the image inputs optional,
            # tritonserver 2.51 checks a request's input count, not names, and an ensemble
            # would wait forever for a missing required input. `dart` and preprocess (the
            # ensemble's gate) refuse a request without CLASSES by name.
            TensorSpec(CLASSES, "TYPE_STRING", (-1,), optional=True),
            TensorSpec(IMAGE_BYTES, "TYPE_STRING", (1,), optional=True),  # or IMAGE
            *_request_options(),
            *_mask_options(),
        ),
        (*_detections(), *masks),
    )


def graph_models(d: GraphDims) -> tuple[str, ...]:
    """The graph models of a repository at `d`: mask_decoder too when built with masks."""
    return MASK_GRAPH_MODELS if d.masks else GRAPH_MODELS


def all_specs(d: GraphDims, shared_passes: bool = False) -> dict[str, ModelSpec]:
    """Every served model's tensors; `shared_passes`: enc_dec batches requests
    (`shared_enc_dec_spec`), and the prompt rows around it travel as items."""
    specs = [
        preprocess_spec(d),
        text_encoder_spec(d, shared_passes),
        backbone_spec(d),
        shared_enc_dec_spec(d) if shared_passes else enc_dec_spec(d),
        postprocess_spec(d, shared_passes),
        dart_spec(d, DART),
        dart_spec(d, DART_ENSEMBLE),
        *([mask_decoder_spec(d)] if d.masks else []),
    ]
    return {s.name: s for s in specs}
