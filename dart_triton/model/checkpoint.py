"""SAM3 checkpoints: load a local Hugging Face `facebook/sam3` directory, or write a tiny one.

Real weights cannot be downloaded in CI, so tests and the demo use a tiny, randomly
initialised SAM3 in exactly the same directory layout (config, safetensors, tokenizer
files built from the real CLIP BPE vocabulary that `open_clip_torch` ships).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
TEXT_MAX_LENGTH = 32  # SAM3's processor pads every prompt to 32 tokens

# Deliberately different tiny architectures: widths, windows, global blocks, queries and
# image sizes all differ, so nothing can silently depend on one of them. "c" also has
# other FPN scales than SAM3's [4, 2, 1, 0.5]: Sam3Model then detects on the 2x level
# (stride 7, 18x18 at 126 px), not at imgsz / 14.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "a": {
        "vit": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=112, window_size=4,
                    global_attn_indexes=[1], pretrain_image_size=56),
        "fpn": 32, "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2),
        "detr": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64),
        "enc_layers": 1, "dec_layers": 2, "queries": 10,
    },
    "b": {
        "vit": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=2, image_size=140, window_size=3,
                    global_attn_indexes=[0, 2], pretrain_image_size=42),
        "fpn": 24, "text": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=2),
        "detr": dict(hidden_size=24, num_attention_heads=3, intermediate_size=48),
        "enc_layers": 2, "dec_layers": 1, "queries": 7,
    },
    "c": {
        "vit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=126, window_size=4,
                    global_attn_indexes=[1], pretrain_image_size=42),
        "scales": [4.0, 2.0, 1.0],
        "fpn": 16, "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2),
        "detr": dict(hidden_size=16, num_attention_heads=2, intermediate_size=32),
        "enc_layers": 1, "dec_layers": 2, "queries": 6,
    },
    # Deep enough for backbone pruning (issue 11): 6 blocks, 2 of them global (the last
    # block among them, as in SAM3), so sub-block search has windowed candidates on both
    # sides of a protected block.
    "d": {
        "vit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                    num_attention_heads=2, image_size=84, window_size=3,
                    global_attn_indexes=[2, 5], pretrain_image_size=42),
        "fpn": 16, "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2),
        "detr": dict(hidden_size=16, num_attention_heads=2, intermediate_size=32),
        "enc_layers": 1, "dec_layers": 1, "queries": 6,
    },
}


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, partial or not SAM3."""


def tiny_config(variant: str = "a"):
    """A valid `Sam3Config` small enough to run in milliseconds on a CPU."""
    from transformers import Sam3Config

    v = TINY_CONFIGS[variant]
    d = v["fpn"]
    detr = v["detr"]
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(model_type="sam3_vit_model", patch_size=14, **v["vit"]),
            fpn_hidden_size=d,
            scale_factors=v.get("scales"),  # None: SAM3's default
        ),
        text_config=dict(max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=d, **v["text"]),
        geometry_encoder_config=dict(num_layers=1, **detr),
        detr_encoder_config=dict(num_layers=v["enc_layers"], **detr),
        detr_decoder_config=dict(num_layers=v["dec_layers"], num_queries=v["queries"], **detr),
        mask_decoder_config=dict(hidden_size=d, num_attention_heads=detr["num_attention_heads"]),
    )


def clip_bpe_vocab_path() -> Path:
    """The CLIP BPE merges file shipped inside the `open_clip_torch` wheel (MIT).

    Located without importing `open_clip` (its import pulls in torchvision).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the CLIP BPE vocabulary comes from the open_clip_torch package: "
            "pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise CheckpointError(f"open_clip_torch is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to
    # code points above 255, so every byte has a visible single-character token.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_clip_tokenizer(out_dir: Path) -> None:
    """Write CLIP tokenizer files (vocab.json, merges.txt, configs) from the BPE merges."""
    with gzip.open(clip_bpe_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tok_cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_MAX_LENGTH, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, variant: str = "a") -> Path:
    """Write a deterministic tiny random SAM3 in the `facebook/sam3` layout."""
    from transformers import Sam3Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Sam3Model(tiny_config(variant)).eval()
    # Default init (std 0.02) leaves every logit near 0 and every score near 0.25,
    # which exercises nothing; wider weights give varied scores and boxes.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5, generator=gen)
        # Lean the presence head towards "present" so that, as with real weights on a
        # matching prompt, some queries clear the default 0.3 score threshold.
        model.detr_decoder.presence_head.layer3.bias.fill_(2.0)
    model.save_pretrained(out)
    write_clip_tokenizer(out)
    return out


def validate_checkpoint_dir(path: str | Path) -> Path:
    """One clear error line for a missing, partial or foreign checkpoint directory."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {root}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{root} is not a Hugging Face checkpoint: config.json is missing")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if model_type not in {"sam3", "sam3_video"}:
        raise CheckpointError(
            f"{root} holds a {model_type!r} model, not SAM3 (expected model_type 'sam3')"
        )
    if not any((root / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{root} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{root} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})"
        )
    return root


def set_image_size(config, imgsz: int) -> None:
    """Make a SAM3 config (or a sam3_video one, which nests the detector) build its
    resolution-dependent buffers for ``imgsz`` input."""
    detector = getattr(config, "detector_config", None) or config
    detector.vision_config.image_size = imgsz


def load_sam3(path: str | Path, imgsz: int | None = None):
    """`Sam3Model` (eager attention, eval mode, FP32) from a local directory.

    `imgsz` rebuilds the resolution-dependent buffers (global-attention RoPE positions)
    for that input size; they are not stored in the weights.
    """
    from transformers import AutoConfig, Sam3Model

    root = validate_checkpoint_dir(path)
    try:
        config = AutoConfig.from_pretrained(root)
        if imgsz is not None:
            set_image_size(config, imgsz)
        model = Sam3Model.from_pretrained(
            root, config=config, attn_implementation="eager", dtype=torch.float32
        )
    except Exception as exc:
        raise CheckpointError(f"cannot load SAM3 from {root}: {exc}") from exc
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    root = validate_checkpoint_dir(path)
    return AutoTokenizer.from_pretrained(root)


def tiny_checkpoint_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dart-triton tiny-checkpoint",
        description="Write a tiny randomly initialised SAM3 checkpoint (for tests and demos: "
        "its detections are meaningless).",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="directory to write (created); same layout as facebook/sam3")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights: same seed, same checkpoint "
                             "(default: %(default)s)")
    parser.add_argument("--variant", choices=sorted(TINY_CONFIGS), default="a",
                        help="tiny architecture; the variants differ in widths, windows, "
                             "global blocks, queries and image size; c also has FPN scales "
                             "[4, 2, 1], so it detects at stride 7, not 14; d has 6 blocks, "
                             "2 global (for pruning) "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    out = write_tiny_checkpoint(args.out_dir, seed=args.seed, variant=args.variant)
    print(f"tiny random SAM3 (variant {args.variant}, seed {args.seed}) written to {out}")
    return 0
