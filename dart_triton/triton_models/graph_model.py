"""backbone / enc_dec on the python backend: the exported ONNX graph in ONNX Runtime.

For a Triton that has only the python backend (like the one in nvidia-pytriton); the
same model names and tensors are served by `tensorrt_plan` or `onnxruntime_onnx` configs.
"""

from __future__ import annotations

import json

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

    def _run(self, request) -> list:
        inputs = {name: pb.as_numpy(pb.required_input(request, name))
                  for name in self.input_names}
        text = inputs.get(specs.TEXT_FEATURES)
        if text is not None:  # enc_dec's prompts per pass; mask_decoder's per call
            check_pass_rows(text.shape[0], self.max_classes)
        outputs = self.graph(**inputs)
        return [pb.pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs,
                                                         strict=True)]

    def execute(self, requests):
        return pb.respond(requests, self._run)
