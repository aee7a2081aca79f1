"""backbone / enc_dec on the python backend: the exported ONNX graph in ONNX Runtime.

For a Triton that has only the python backend (like the one in nvidia-pytriton); the
same model names and tensors are served by `tensorrt_plan` or `onnxruntime_onnx` configs.

A backbone built with ``--max-batch B`` (max_batch_size B, Triton's dynamic batcher,
backbone.onnx exported with a dynamic frame count) runs the frames of every request of
a batch in one session call and answers each request with its own rows (a request that
cannot be read is answered alone). An enc_dec with shared passes (max_batch_size > 0:
`specs.shared_enc_dec_spec`, enc_dec.onnx with a frame index) packs the requests of a
batch into passes of rows from several frames (`shared_pass_binding`).
"""

from __future__ import annotations

import json

import numpy as np

from dart_triton.contract import specs
from dart_triton.contract.parameters import OnnxGraphParameters
from dart_triton.contract.passes import check_pass_rows
from dart_triton.graphs.runtime import OrtGraph
from dart_triton.triton_models import pb
from dart_triton.triton_models.shared_pass_binding import respond_shared


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
        self.shared = config["name"] == specs.ENC_DEC and config.get("max_batch_size", 0) > 0
        graph_inputs = [i.name for i in self.graph.session.get_inputs()]
        if self.shared and specs.FRAME_INDEX not in graph_inputs:
            raise ValueError(f"enc_dec batches requests (max_batch_size > 0) but its graph "
                             f"has no {specs.FRAME_INDEX} input: rebuild the repository")

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

    def _shared_pass(self, features, text_features, text_mask, frame_index):
        return self.graph(**{specs.FPN_FEATURES: features, specs.TEXT_FEATURES: text_features,
                             specs.TEXT_MASK: text_mask, specs.FRAME_INDEX: frame_index})

    def execute(self, requests):
        if self.shared:
            return respond_shared(
                requests, self._shared_pass, self.max_classes, self.output_names,
                lambda name, t: pb.as_numpy(t),
                lambda name, rows: pb.pb_utils.Tensor(name, np.stack(rows)))
        if self.batched and len(requests) > 1:
            return pb.respond_batch(requests, lambda r: self._inputs(r)[specs.PIXEL_VALUES],
                                    self._run_batch)
        return pb.respond(requests, self._run)
