"""backbone / enc_dec on the python backend: the exported ONNX graph in ONNX Runtime.

For a Triton that has only the python backend (like the one in nvidia-pytriton); the
same model names and tensors are served by `tensorrt_plan` or `onnxruntime_onnx` configs.

A backbone built with ``--max-batch B`` (max_batch_size B, Triton's dynamic batcher,
backbone.onnx exported with a dynamic frame count) runs the frames of every request of
a batch in one session call and answers each request with its own rows (a request that
cannot be read is answered alone).
"""

from __future__ import annotations

import json

import numpy as np

from dart_triton.contract import specs
from dart_triton.contract.parameters import OnnxGraphParameters
from dart_triton.contract.passes import check_pass_rows
from dart_triton.graphs.runtime import OrtGraph
from dart_triton.triton_models import pb


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = pb.model_parameters(args, OnnxGraphParameters)
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.max_classes = params.max_classes
        self.graph = OrtGraph(pb.version_dir(args) / params.graph, params.ort_threads,
                              spin=False)
        if self.graph.output_names != self.output_names:
            raise ValueError(f"graph outputs {self.graph.output_names} != config "
                             f"{self.output_names}")
        # A graph with a fixed frame count (exported for one frame) runs a batch per request.
        frames = self.graph.session.get_inputs()[0].shape[0]
        self.batched = (config["name"] == specs.BACKBONE
                        and config.get("max_batch_size", 0) > 0 and not isinstance(frames, int))

    def _inputs(self, request) -> dict[str, np.ndarray]:
        inputs = {name: pb.as_numpy(pb.required_input(request, name))
                  for name in self.input_names}
        text = inputs.get(specs.TEXT_FEATURES)
        if text is not None:  # enc_dec's prompts per pass; mask_decoder's per call
            check_pass_rows(text.shape[0], self.max_classes)
        return inputs

    def _tensors(self, outputs) -> list:
        return [pb.pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs,
                                                         strict=True)]

    def _run(self, request) -> list:
        return self._tensors(self.graph(**self._inputs(request)))

    def _run_batch(self, frames: list[np.ndarray]) -> list[list]:
        """The frames of every request in one session call, split back per request."""
        cuts = np.cumsum([f.shape[0] for f in frames])[:-1]
        outputs = self.graph(**{specs.PIXEL_VALUES: np.concatenate(frames)})
        return [self._tensors(rows)
                for rows in zip(*(np.split(o, cuts) for o in outputs), strict=True)]

    def execute(self, requests):
        if self.batched and len(requests) > 1:
            return pb.respond_batch(requests, lambda r: self._inputs(r)[specs.PIXEL_VALUES],
                                    self._run_batch)
        return pb.respond(requests, self._run)
