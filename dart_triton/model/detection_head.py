"""SAM3's DETR encoder-decoder as a batched, detection-only head (DART §3.2).

One image's detection-level FPN features are broadcast to N class prompts inside the graph, so
all prompts are decoded in one pass. Text enters only through cross-attention, which
is independent across the batch axis, so row i equals SAM3 run alone on prompt i.
The mask head is apart (`mask_head`: run only for kept detections); shape-only tensors
(image position encoding, the coordinate grids of the box relative-position bias) are
constants for the build resolution.
Only the last decoder layer is scored: earlier layers' logits are training signals.

Work that does not depend on the prompt runs once per pass, not once per prompt, and is
then broadcast: the first encoder layer's self-attention (it sees only image tokens,
before any text enters: 60% of that layer's FLOPs at 1008 px) and the first decoder
layer's self-attention, query positions and box bias (every prompt starts from the same
learned queries and reference boxes). The arithmetic is the same, so the outputs are.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from dart_triton.contract.specs import GraphDims

# Additive mask value for padded text tokens: finite in FP16, exp() underflows to 0.
MASK_NEG = -65504.0


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _signed_log(d: torch.Tensor) -> torch.Tensor:
    d = d * 8
    return torch.sign(d) * torch.log2(d.abs() + 1.0) / math.log2(8)


# The layers of transformers' Sam3DetrEncoderLayer / Sam3DetrDecoderLayer, split where
# text first enters, so that the part before runs on one image and is broadcast.


def _encoder_self_attention(layer: nn.Module, vision: torch.Tensor,
                            pos: torch.Tensor) -> torch.Tensor:
    """Pre-norm self-attention over image tokens, with its residual (no text involved)."""
    hidden = layer.layer_norm1(vision)
    with_pos = hidden + pos
    out, _ = layer.self_attn(query=with_pos, key=with_pos, value=hidden)
    return layer.dropout(out) + vision


def _encoder_text_and_mlp(layer: nn.Module, vision: torch.Tensor, text: torch.Tensor,
                          text_bias: torch.Tensor) -> torch.Tensor:
    """The rest of the encoder layer: cross-attention to the prompt's tokens, then the MLP."""
    hidden = layer.layer_norm2(vision)
    out, _ = layer.cross_attn(query=hidden, key=text, value=text, attention_mask=text_bias)
    vision = layer.dropout(out) + vision
    return layer.dropout(layer.mlp(layer.layer_norm3(vision))) + vision


def _decoder_self_attention(layer: nn.Module, hidden: torch.Tensor,
                            query_pos: torch.Tensor) -> torch.Tensor:
    """Post-norm self-attention among the queries (and the presence token)."""
    with_pos = hidden + query_pos
    out, _ = layer.self_attn(query=with_pos, key=with_pos, value=hidden, attention_mask=None)
    return layer.self_attn_layer_norm(hidden + layer.self_attn_dropout(out))


def _decoder_cross_and_mlp(layer: nn.Module, hidden: torch.Tensor, query_pos: torch.Tensor,
                           text: torch.Tensor, text_bias: torch.Tensor, vision: torch.Tensor,
                           vision_pos: torch.Tensor, rpb: torch.Tensor) -> torch.Tensor:
    """The rest of the decoder layer: text cross-attention, vision cross-attention, MLP."""
    out, _ = layer.text_cross_attn(query=hidden + query_pos, key=text, value=text,
                                   attention_mask=text_bias)
    hidden = layer.text_cross_attn_layer_norm(hidden + layer.text_cross_attn_dropout(out))
    out, _ = layer.vision_cross_attn(query=hidden + query_pos, key=vision + vision_pos,
                                     value=vision, attention_mask=rpb)
    hidden = layer.vision_cross_attn_layer_norm(hidden + layer.vision_cross_attn_dropout(out))
    return layer.mlp_layer_norm(hidden + layer.mlp_dropout(layer.mlp(hidden)))


class BatchedDetectionHead(nn.Module):
    """(fpn_features [1,C,h,w], text_features [N,L,D], text_mask [N,L]) -> boxes, logits, presence.

    A shared pass (rows of several frames, `specs.FRAME_INDEX`): fpn_features [F,C,h,w] and
    frame_index [N] (int64, row -> frame); the image-only work still runs once per frame.

    Outputs: boxes [N,Q,4] xyxy in [0,1], logits [N,Q], presence logits [N,1]; with
    `mask_inputs`, also encoder memory [N,h*w,C] and decoder queries [N,Q,C].
    """

    def __init__(self, sam3_model, dims: GraphDims, attn_implementation: str = "eager",
                 mask_inputs: bool | None = None):
        """`dims.feat_hw` sizes the shape-only constants (the side of the level `Sam3Model`
        reads, from the checkpoint's scale factors); `attn_implementation`: "eager"
        (explicit softmax attention: what is exported) or
        "sdpa" for the PyTorch runtime, where a fused kernel avoids materialising the
        [N, heads, h*w, h*w] encoder attention (GBs at 1008 px and 16 prompts).
        `mask_inputs` (default: `dims.masks`): also return the encoder memory and the last
        decoder layer's queries, what the mask head reads (`specs.MASK_INPUTS`)."""
        super().__init__()
        self.mask_inputs = dims.masks if mask_inputs is None else mask_inputs
        self.encoder_layers = sam3_model.detr_encoder.layers
        dec = sam3_model.detr_decoder
        self.decoder_layers = dec.layers
        if attn_implementation != "eager":
            # Own copies: the layers read the attention kind from their (shared) config,
            # and the reference model must keep its own.
            self.encoder_layers = copy.deepcopy(self.encoder_layers)
            self.decoder_layers = copy.deepcopy(self.decoder_layers)
            for layers in (self.encoder_layers, self.decoder_layers):
                layers[0].self_attn.config._attn_implementation = attn_implementation
        self.output_norm = dec.output_layer_norm
        self.box_head = dec.box_head
        self.presence_head, self.presence_norm = dec.presence_head, dec.presence_layer_norm
        self.presence_clamp = float(dec.clamp_presence_logit_max_val)
        self.ref_point_head = dec.ref_point_head
        self.rpb_x, self.rpb_y = dec.box_rpb_embed_x, dec.box_rpb_embed_y
        self.box_sine = dec.position_encoding
        self.scoring = sam3_model.dot_product_scoring

        neck = sam3_model.vision_encoder.neck
        c = sam3_model.config.vision_config.fpn_hidden_size
        feat_hw = dims.feat_hw
        with torch.no_grad():
            pos = neck.position_encoding((1, c, feat_hw, feat_hw), "cpu", torch.float32)
            grid = torch.arange(feat_hw, dtype=torch.float32) / feat_hw
        self.register_buffer("vision_pos", pos.flatten(2).transpose(1, 2).clone(), persistent=False)
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("queries", dec.query_embed.weight.detach().clone(), persistent=False)
        self.register_buffer(
            "ref_boxes", dec.reference_points.weight.detach().sigmoid().clone(), persistent=False
        )
        self.register_buffer(
            "presence_token", dec.presence_token.weight.detach().clone(), persistent=False
        )

    def _rpb(self, boxes_cxcywh: torch.Tensor) -> torch.Tensor:
        """Box relative-position bias [N, heads, Q, h*w] (log-scale distances to box edges)."""
        xyxy = _cxcywh_to_xyxy(boxes_cxcywh)  # [N, Q, 4]
        dx = self.grid[None, None, :, None] - xyxy[:, :, None, 0::2]  # [N, Q, w, 2]
        dy = self.grid[None, None, :, None] - xyxy[:, :, None, 1::2]  # [N, Q, h, 2]
        bx = self.rpb_x(_signed_log(dx))  # [N, Q, w, heads]
        by = self.rpb_y(_signed_log(dy))  # [N, Q, h, heads]
        bias = by.unsqueeze(3) + bx.unsqueeze(2)  # [N, Q, h, w, heads]
        return bias.flatten(2, 3).permute(0, 3, 1, 2)

    def forward(
        self, fpn_features: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor,
        frame_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        n = text_features.shape[0]
        valid = text_mask.to(text_features.dtype)  # [N, L], 1 = token
        text_bias = ((1.0 - valid) * MASK_NEG)[:, None, None, :]  # [N, 1, 1, L]
        pos = self.vision_pos.expand(n, -1, -1)

        # Encoder. The backbone ran once; the first layer's self-attention runs once too,
        # and every prompt continues from its result.
        first, *rest = self.encoder_layers
        vision = fpn_features.flatten(2).transpose(1, 2)  # [F, h*w, C]
        vision = _encoder_self_attention(first, vision, self.vision_pos)
        # Each row continues from its own frame's result (a gather), or from the one frame's.
        vision = (vision.expand(n, -1, -1) if frame_index is None
                  else vision.index_select(0, frame_index.long()))
        vision = _encoder_text_and_mlp(first, vision, text_features, text_bias)
        for layer in rest:
            vision = layer(vision, prompt_feats=text_features, vision_pos_encoding=pos,
                           prompt_cross_attn_mask=text_bias)

        # Decoder. Layer 1 starts from the same queries and boxes for every prompt.
        q = self.queries.shape[0]
        hidden = torch.cat((self.presence_token, self.queries), dim=0)[None]  # [1, 1+Q, C]
        boxes = self.ref_boxes[None]  # [1, Q, 4]
        rpb = self._rpb(boxes)
        presence_pad = torch.zeros_like(rpb[:, :, :1])
        for i, layer in enumerate(self.decoder_layers):
            if i:
                rpb = self._rpb(boxes)
            query_pos = F.pad(self.ref_point_head(self.box_sine.encode_boxes(boxes)),
                              (0, 0, 1, 0))  # the presence token has no position
            rpb = torch.cat((presence_pad.expand(rpb.shape[0], -1, -1, -1), rpb), dim=2)
            hidden = _decoder_self_attention(layer, hidden, query_pos)
            if i == 0:  # from here on, each prompt's own
                hidden, query_pos = hidden.expand(n, -1, -1), query_pos.expand(n, -1, -1)
                rpb = rpb.expand(n, -1, -1, -1)
            hidden = _decoder_cross_and_mlp(layer, hidden, query_pos, text_features, text_bias,
                                            vision, pos, rpb)
            query_hidden = self.output_norm(hidden[:, 1:])
            boxes = (self.box_head(query_hidden) + _inverse_sigmoid(boxes)).sigmoid()

        presence = self.presence_head(self.presence_norm(hidden[:, :1])).squeeze(-1)
        presence = presence.clamp(-self.presence_clamp, self.presence_clamp)
        logits = self.scoring(query_hidden[None], text_features, valid)[0].squeeze(-1)
        assert logits.shape[-1] == q
        if self.mask_inputs:  # [N, h*w, C] encoder memory, [N, Q, C] decoder queries
            return _cxcywh_to_xyxy(boxes), logits, presence, vision, query_hidden
        return _cxcywh_to_xyxy(boxes), logits, presence
