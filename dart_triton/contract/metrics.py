"""The Prometheus metrics the python models add to Triton's (metrics port, /metrics).

One place for their names and labels: the models create them, tests, benchmarks and
dashboards read them.
"""

from __future__ import annotations

# dart: requests answered with an error, by Triton error code (label `code`).
REQUEST_FAILURES = "dart_request_failures_total"
FAILURE_CODES = ("INVALID_ARG", "INTERNAL", "UNAVAILABLE")

# dart: where a request's time goes (label `step`). seconds / calls is a step's mean.
STEP_SECONDS = "dart_step_seconds_total"
STEP_CALLS = "dart_step_calls_total"
# read: reading and checking the request; preprocess: resize and normalise; backbone,
# text_encoder, enc_dec: each BLS call from sending it to its answer (the called model's
# queue and compute time included; backbone and text_encoder run at once, enc_dec once
# per pass); select: scores, threshold, NMS, cap; respond: the output tensors;
# mask_decoder: each BLS call for masks (only requests with RETURN_MASKS make any).
STEPS = ("read", "preprocess", "backbone", "text_encoder", "enc_dec", "select", "respond",
         "mask_decoder")

# text_encoder: class names served from the embedding cache, and encoded.
TEXT_CACHE_HITS = "dart_text_cache_hits_total"
TEXT_CACHE_MISSES = "dart_text_cache_misses_total"

# torch graph models: inputs received, by model, input and memory (cpu / gpu).
GRAPH_INPUTS = "dart_graph_inputs_total"
