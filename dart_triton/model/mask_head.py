"""SAM3's mask head for the kept detections only (issue: masks on demand).

`transformers`' `Sam3MaskDecoder` makes masks for every query of every prompt; here only
the prompts that kept a detection come in, and of those only the kept queries, padded to
the same count J per prompt. Per prompt, the DETR encoder's image tokens attend to the
prompt's text, take the detection level's place among the backbone's FPN levels, and the
pixel decoder climbs to the finest level; each kept query's mask embedding is then dotted
with its prompt's pixel embedding. Same weights and arithmetic as the reference, so a
kept query's mask logits equal `Sam3Model`'s for that prompt and query. The semantic
segmentation output is not computed (nothing here reads it).
"""

from __future__ import annotations

import torch
from torch import nn

from dart_triton.contract.specs import GraphDims
from dart_triton.model.detection_head import MASK_NEG


class MaskHead(nn.Module):
    """(mask levels finest first [1,C,Hi,Wi]..., encoder_memory [P,h*w,C], text_features
    [P,L,D], text_mask [P,L], kept_queries [P,J,C]) -> mask_logits [P,J,m,m].

    `mask_levels`: how many finer backbone levels precede the encoder memory
    (`GraphDims.mask_levels`); m is the finest one's side (`GraphDims.mask_hw`)."""

    def __init__(self, sam3_model, dims: GraphDims):
        super().__init__()
        dec = sam3_model.mask_decoder
        self.cross_attn, self.cross_norm = dec.prompt_cross_attn, dec.prompt_cross_attn_norm
        self.pixel_decoder = dec.pixel_decoder
        self.instance_projection = dec.instance_projection
        self.mask_embedder = dec.mask_embedder
        self.feat_hw = dims.feat_hw
        self.num_levels = len(dims.mask_levels)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        levels = inputs[:self.num_levels]
        memory, text_features, text_mask, queries = inputs[self.num_levels:]
        p, _, c = memory.shape
        valid = text_mask.to(text_features.dtype)
        text_bias = ((1.0 - valid) * MASK_NEG)[:, None, None, :]  # [P, 1, 1, L]
        attended, _ = self.cross_attn(query=self.cross_norm(memory), key=text_features,
                                      value=text_features, attention_mask=text_bias)
        memory = memory + attended
        detection = memory.transpose(1, 2).reshape(p, c, self.feat_hw, self.feat_hw)
        # The finer levels are the image's own (one frame), shared by every prompt.
        features = [level.expand(p, -1, -1, -1) for level in levels] + [detection]
        pixels = self.instance_projection(self.pixel_decoder(features))  # [P, C, m, m]
        embeddings = self.mask_embedder(queries)  # [P, J, C]
        logits = torch.bmm(embeddings, pixels.flatten(2))  # [P, J, m*m]
        return logits.unflatten(2, pixels.shape[-2:])
