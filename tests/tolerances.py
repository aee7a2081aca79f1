"""Parity tolerances, each with the float error it bounds (one place, stated once).

Everything runs in float32 (24-bit mantissa, eps = 1.19e-7). Two runs of the same SAM3
maths differ by rounding alone: batched (N prompts at once) vs per prompt, ONNX Runtime
vs eager PyTorch, and one x86_64 CPU vs another (AVX2 vs AVX-512 kernels sum a dot
product in other orders). The tiny random checkpoints make this worse than real weights:
variant c's FPN features reach ~500, so the encoder's 256-wide dot products carry
absolute rounding errors ~500 x 256 x eps ~ 1.5e-2 relative to their sums' magnitude,
which layer norms bring back down to ~1e-5 on the outputs.

A wrong result (a prompt's features mixed up, a wrong detection level, a dropped pass)
moves logits by 1e-1 or more and boxes by whole cells, far outside these bounds.
"""

# Head outputs (pred_logits, presence_logits, normalised pred_boxes): batched
# `BatchedDetectionHead` vs `Sam3Model` once per prompt, and the restructured backbone's
# FPN levels vs `Sam3VisionModel`. Measured worst: 3e-5 (variant c).
HEAD_ATOL = 1e-4

# Scores are sigmoid(logit) * sigmoid(presence logit): each factor's slope is at most 1/4,
# so logits within HEAD_ATOL give scores within 2 x HEAD_ATOL / 4. Measured worst: 1.2e-5
# (in process, variant c, 9 classes, AMD EPYC Zen 3), 4e-5 (ONNX Runtime vs eager, see
# SERVED_SCORE_ATOL).
SCORE_ATOL = HEAD_ATOL / 2

# Boxes in pixels: normalised boxes within HEAD_ATOL, times the image side.
BOX_ATOL_PER_PIXEL = HEAD_ATOL

# Served ONNX Runtime graphs vs eager PyTorch on variant c (FPN features ~500): ORT's
# fused kernels round differently; measured 4e-5 on scores, bound at twice SCORE_ATOL.
SERVED_SCORE_ATOL = 2 * SCORE_ATOL

# A request served in a batch (frames sharing a backbone call, prompts of several frames
# sharing an enc_dec pass) vs the same request alone, on the torch backend: PyTorch's CPU
# kernels block a product differently by its batch size. Measured worst: 1.06e-4 (the
# default tiny checkpoint, a photo crop, 3 classes); the python backend (ONNX Runtime)
# gave identical scores. Bound at twice SERVED_SCORE_ATOL.
BATCHED_SCORE_ATOL = 2 * SERVED_SCORE_ATOL

# Mask logits, relative to the largest |logit| of the reference mask: the mask head repeats
# SAM3's arithmetic on features within HEAD_ATOL. Measured worst: 4e-6 (variant c, whose
# random mask logits are ~4e-3 in size). A mask from the wrong prompt or query is off by
# the logits' whole size.
MASK_LOGIT_RTOL = 1e-4

# Served masks vs the reference (Sam3Model per prompt, then Sam3Processor's
# post_process_instance_segmentation): IoU of the binary masks at the image's size. The
# logits agree to ~1e-6 of their size, so only pixels whose probability is that close to
# the threshold can differ. Measured worst: 0.9989 (variant c, 10 classes).
MASK_MIN_IOU = 0.99
