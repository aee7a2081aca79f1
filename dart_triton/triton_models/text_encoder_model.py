"""text_encoder: CLASSES [N] -> text_features [N, L, D] + text_mask [N, L], via the cache.

One instance holds one cache; its hits and misses are Triton metrics
(`dart_text_cache_hits_total`, `dart_text_cache_misses_total` on the metrics port).
The cache starts warm from `text_cache.safetensors` (+ its JSON index). A cache it cannot
use (an old pickle-capable .npz, other weights, a corrupt or foreign file) costs one log
line; the cache is then rebuilt from the warm vocabulary and the model loads anyway.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dart_triton.contract import metrics, specs
from dart_triton.contract.parameters import TextEncoderParameters
from dart_triton.contract.validation import check_classes
from dart_triton.model.text_encoder import CACHE_FILE, TextEncoder, read_vocabulary
from dart_triton.triton_models import pb

LEGACY_CACHE_FILE = "text_cache.npz"  # the pickled format before safetensors: never opened


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = pb.model_parameters(args, TextEncoderParameters)
        root = pb.version_dir(args)
        self.max_classes = params.max_classes
        self.device = pb.device_of(args)
        self.encoder = TextEncoder.from_pretrained(root / "text_encoder", device=self.device)
        self._warm(root, params.warm_vocabulary)
        self.encoder.stats.hits = self.encoder.stats.misses = 0  # count requests only
        family = pb.pb_utils.MetricFamily
        # The families must outlive their metrics: keep both on the instance.
        self.hit_family = family(name=metrics.TEXT_CACHE_HITS,
                                 description="class names served from the text embedding cache",
                                 kind=family.COUNTER)
        self.miss_family = family(name=metrics.TEXT_CACHE_MISSES,
                                  description="class names run through the text encoder",
                                  kind=family.COUNTER)
        self.hits = self.hit_family.Metric(labels={})
        self.misses = self.miss_family.Metric(labels={})

    def _warm(self, root: Path, vocabulary: str) -> None:
        """Load the cache file, or else encode the warm vocabulary (if there is one)."""
        cache, legacy = root / CACHE_FILE, root / LEGACY_CACHE_FILE
        if cache.is_file():
            try:
                self.encoder.load_cache(cache)
                return
            except Exception as exc:  # whatever is wrong with the file, rebuilding fixes it
                problem = "refused the text cache: " + " ".join(str(exc).split())  # one line
        elif legacy.is_file():
            problem = (f"refused the text cache: {legacy} is an old .npz cache, not read "
                       "(unpickling it could run code)")
        else:
            problem = None
        vocab = root / vocabulary if vocabulary else None
        if problem:
            pb.log(f"text_encoder: {problem}; " + (
                f"rebuilding it from {vocab.name}" if vocab and vocab.is_file()
                else "starting with an empty cache"), level="warn")
        if vocab and vocab.is_file():
            self.encoder.encode(read_vocabulary(vocab))

    def _run(self, request) -> list:
        names = check_classes(pb.read_classes(request), self.max_classes)
        before = (self.encoder.stats.hits, self.encoder.stats.misses)
        with torch.inference_mode():
            feats, mask = self.encoder.encode(names)
        self.hits.increment(self.encoder.stats.hits - before[0])
        self.misses.increment(self.encoder.stats.misses - before[1])
        return [pb.pb_utils.Tensor(specs.TEXT_FEATURES, feats),
                pb.pb_utils.Tensor(specs.TEXT_MASK, mask)]

    def execute(self, requests):
        return pb.respond(requests, self._run)
