"""text_encoder: CLASSES [N] -> text_features [N, L, D] + text_mask [N, L], via the cache.

One instance holds one cache; its hits and misses are Triton metrics
(`dart_text_cache_hits_total`, `dart_text_cache_misses_total` on the metrics port).
"""

from __future__ import annotations

import torch

from dart_triton import specs
from dart_triton.text_encoder import TextEncoder, read_vocabulary
from dart_triton.triton import pb
from dart_triton.validation import check_classes, decode_class_names

CACHE_FILE = "text_cache.npz"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = pb.model_params(args)
        root = pb.version_dir(args)
        self.max_classes = int(params.get("max_classes", specs.MAX_REQUEST_CLASSES))
        self.device = pb.device_of(args)
        self.encoder = TextEncoder.from_pretrained(root / "text_encoder", device=self.device)
        cache = root / CACHE_FILE
        vocab = root / params.get("warm_vocabulary", "")
        if cache.is_file():
            self.encoder.load_cache(cache)
        elif params.get("warm_vocabulary") and vocab.is_file():
            self.encoder.encode(read_vocabulary(vocab))
        self.encoder.stats.hits = self.encoder.stats.misses = 0  # count requests only
        family = pb.pb_utils.MetricFamily
        # The families must outlive their metrics: keep both on the instance.
        self.hit_family = family(name="dart_text_cache_hits_total",
                                 description="class names served from the text embedding cache",
                                 kind=family.COUNTER)
        self.miss_family = family(name="dart_text_cache_misses_total",
                                  description="class names run through the text encoder",
                                  kind=family.COUNTER)
        self.hits = self.hit_family.Metric(labels={})
        self.misses = self.miss_family.Metric(labels={})

    def _run(self, request) -> list:
        names = decode_class_names(pb.as_numpy(pb.required_input(request, specs.CLASSES)))
        check_classes(names, self.max_classes)
        before = (self.encoder.stats.hits, self.encoder.stats.misses)
        with torch.inference_mode():
            feats, mask = self.encoder.encode(names)
        self.hits.increment(self.encoder.stats.hits - before[0])
        self.misses.increment(self.encoder.stats.misses - before[1])
        return [pb.pb_utils.Tensor(specs.TEXT_FEATURES, feats),
                pb.pb_utils.Tensor(specs.TEXT_MASK, mask)]

    def execute(self, requests):
        return pb.respond(requests, self._run)
