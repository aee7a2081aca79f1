"""Mask logits -> RLE at the image's size: the processor's resize, in bounded memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dart_triton.model.masks import decode_rle, mask_rles


def _processor_masks(logits: torch.Tensor, size, threshold: float) -> np.ndarray:
    """What Sam3Processor.post_process_instance_segmentation does to kept masks."""
    probs = F.interpolate(torch.sigmoid(logits)[None], size=size, mode="bilinear",
                          align_corners=False)[0]
    return (probs > threshold).numpy()


@pytest.mark.parametrize("m, size", [(32, (512, 512)), (36, (48, 64)), (32, (1000, 37)),
                                     (72, (640, 480)), (8, (8, 8))])
@pytest.mark.parametrize("block", [1 << 24, 97])  # whole masks; bands of a few rows
def test_rle_equals_the_processors_masks(m, size, block):
    g = torch.Generator().manual_seed(m)
    logits = torch.randn(6, m, m, generator=g) * 3
    logits[0] = -5  # empty
    logits[1] = 5  # the whole image
    logits[2] = -5
    logits[2, 3:5, 4:6] = 5  # a blob: only its neighbourhood is resized
    for threshold in (0.5, 0.8):
        want = _processor_masks(logits, size, threshold)
        got = np.stack([decode_rle(r, size) for r in mask_rles(logits, size, threshold, block)])
        np.testing.assert_array_equal(got, want)
    assert not got[0].any() and got[1].all()


def test_thousand_masks_on_an_8k_image_stay_in_bounded_memory():
    """1000 masks at 8192 x 8192 would be 64 GiB as booleans; encoding them one at a time,
    in bands, peaks at one mask's booleans plus a band (~100 MB), whatever K is."""
    script = textwrap.dedent("""
        import resource, torch
        from dart_triton.model.masks import mask_rles, decode_rle
        logits = torch.full((1000, 72, 72), -6.0)
        for k in range(1000):  # objects of all sizes, two covering most of the image
            r, c = (k * 7) % 60, (k * 13) % 60
            logits[k, r:r + 2 + k % 10, c:c + 2 + k % 7] = 6.0
        logits[10, 2:70, 2:70] = 6.0
        logits[500, :, :] = 6.0
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rles = mask_rles(logits, (8192, 8192), 0.5)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        assert len(rles) == 1000 and decode_rle(rles[500], (8192, 8192)).all()
        print(f"{grown:.0f}")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    grown_mb = float(out.stdout.split()[-1])
    assert grown_mb < 1024, f"peak memory grew by {grown_mb:.0f} MB"
