"""SAM3's ViT + FPN neck, restructured for FP16 inference engines (DART §3.3).

Same weights and the same function as `transformers`' `Sam3VisionModel`, but the graph
is written so that TensorRT's attention pattern matcher recognises every block:

* RoPE in real arithmetic: q·cos + rotate(q)·sin with cos/sin precomputed as constants
  for the build resolution (no complex numbers, no position-id arithmetic at run time);
* attention as explicit ``softmax(Q·Kᵀ·scale)·V`` (no SDPA or fused attention op);
* the tiled absolute position embedding precomputed (no data-dependent ``If`` nodes);
* only the FPN levels that are asked for: detection reads one level alone (the one
  `Sam3Model` reads, see `specs.GraphDims.detection_level`), the finer ones feed only the
  mask head (with SAM3's scales, at 1008 px the 4x level is 85 MB of FP32 per frame).
"""

from __future__ import annotations

import torch
from torch import nn

from dart_triton.contract.specs import PATCH_SIZE, GraphDims


def _pair(x) -> tuple[int, int]:
    return tuple(x) if isinstance(x, list | tuple) else (x, x)


def _rope_tables(layer, tokens_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq, head_dim] for one ViT layer, computed in float64 then cast.

    Positions follow SAM3: a window (or the whole grid for global layers) is indexed in
    units scaled so that the grid spans `window_size`, with x in the first half of the
    head dim and y in the second, each frequency repeated for its pair of channels.
    """
    ref = layer.rotary_emb
    ids = layer.position_ids
    cos, sin = ref(torch.zeros(1, device=ids.device), ids)  # the reference's own tables
    seq = tokens_hw[0] * tokens_hw[1]
    assert cos.shape[-2] == seq, (cos.shape, tokens_hw)
    dtype = layer.attention.q_proj.weight.dtype  # FP16 models get FP16 tables
    return cos.reshape(seq, -1).to(dtype), sin.reshape(seq, -1).to(dtype)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) with slicing only."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RopeAttention(nn.Module):
    """Self-attention over [B, S, C] tokens with real-valued RoPE.

    ``attention="explicit"`` (the exported graph): ``softmax(Q·Kᵀ·scale)·V`` written out,
    the pattern TensorRT fuses and keeps accurate in FP16. ``"sdpa"`` (the torch backend,
    `torch_graphs.use_sdpa`): PyTorch's fused kernel, which accumulates in FP32 and never
    materialises the score matrix. Same weights, same RoPE tables, same tensor names."""

    attention: str = "explicit"

    def __init__(self, ref_attention, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.q_proj, self.k_proj = ref_attention.q_proj, ref_attention.k_proj
        self.v_proj, self.o_proj = ref_attention.v_proj, ref_attention.o_proj
        self.num_heads = ref_attention.num_attention_heads
        self.head_dim = ref_attention.head_dim
        self.scale = float(ref_attention.scaling)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # [B, H, S, Dh]
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = q * self.cos + rotate_pairs(q) * self.sin
        k = k * self.cos + rotate_pairs(k) * self.sin
        if self.attention == "sdpa":
            out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            out = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, c))


class ViTBlock(nn.Module):
    """Pre-norm block; windowed blocks partition the (padded) grid into windows."""

    def __init__(self, ref_layer, grid: tuple[int, int]):
        super().__init__()
        self.norm1, self.norm2 = ref_layer.layer_norm1, ref_layer.layer_norm2
        self.mlp = ref_layer.mlp
        self.window = int(ref_layer.window_size)
        self.grid = grid
        tokens_hw = (self.window, self.window) if self.window > 0 else grid
        self.attn = RopeAttention(ref_layer.attention, *_rope_tables(ref_layer, tokens_hw))

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = (-h) % ws, (-w) % ws
        if ph or pw:
            x = nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
        hh, ww = (h + ph) // ws, (w + pw) // ws
        x = x.view(b, hh, ws, ww, ws, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b * hh * ww, ws * ws, c)

    def _unpartition(self, x: torch.Tensor, b: int) -> torch.Tensor:
        h, w = self.grid
        ws = self.window
        hh, ww = -(-h // ws), -(-w // ws)
        c = x.shape[-1]
        x = x.view(b, hh, ww, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh * ws, ww * ws, c)
        return x[:, :h, :w, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A pruned sub-block (see `backbones.pruned`) is None: its residual branch is skipped.
        if self.attn is not None:
            x = x + self.attention_branch(x)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.window > 0:
            return self._unpartition(self.attn(self._partition(y)), b)
        return self.attn(y.reshape(b, h * w, c)).view(b, h, w, c)


class RestructuredBackbone(nn.Module):
    """pixel_values [1, 3, S, S] -> the requested FPN levels, detection level first.

    `levels` indexes `Sam3VisionModel`'s neck outputs; by default only the level that
    SAM3's detector reads (`detection_level`).
    """

    def __init__(self, vision_model, imgsz: int, levels: list[int] | None = None):
        super().__init__()
        vit = vision_model.backbone
        cfg = vit.config
        if imgsz % PATCH_SIZE or cfg.patch_size != PATCH_SIZE:
            raise ValueError(f"imgsz must be a multiple of {PATCH_SIZE}, got {imgsz}")
        model_hw = _pair(cfg.image_size)
        if model_hw != (imgsz, imgsz):
            # Global blocks' RoPE tables are fixed by config.image_size: build at that size.
            raise ValueError(
                f"model was configured for {model_hw[0]}x{model_hw[1]} images, not {imgsz}: "
                "load the checkpoint with the target image size (load_sam3(path, imgsz))"
            )
        grid = (imgsz // PATCH_SIZE, imgsz // PATCH_SIZE)
        self.grid = grid
        self.patch_embed = vit.embeddings.patch_embeddings.projection
        with torch.no_grad():
            pos = vit.embeddings._tile_position_embeddings(
                vit.embeddings.position_embeddings, grid[0], grid[1]
            )
        # detach: at the pretraining size the "tiled" embedding is the parameter itself
        pos = pos.reshape(1, grid[0], grid[1], -1).detach().clone()
        self.register_buffer("pos_embed", pos, persistent=False)
        self.pre_norm = vit.layer_norm
        self.blocks = nn.ModuleList(ViTBlock(layer, grid) for layer in vit.layers)
        self.levels = [detection_level(vision_model)] if levels is None else list(levels)
        self.fpn = nn.ModuleList(vision_model.neck.fpn_layers[i] for i in self.levels)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.patch_embed(pixel_values)  # [1, C, h, w]
        x = x.permute(0, 2, 3, 1) + self.pos_embed
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return tuple(layer(x) for layer in self.fpn)


def neck_dims(vision_model, masks: bool = False) -> GraphDims:
    """The neck's layout as `specs.GraphDims` sees it (only the scale-derived fields count)."""
    return GraphDims(scale_factors=tuple(vision_model.config.scale_factors),
                     masks=masks)


def detection_level(vision_model) -> int:
    """Neck index of the level `Sam3Model` feeds its DETR encoder-decoder."""
    return neck_dims(vision_model).detection_level
