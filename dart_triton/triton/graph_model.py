"""backbone / enc_dec on the python backend: the exported ONNX graph in ONNX Runtime.

For a Triton that has only the python backend (like the one in nvidia-pytriton); the
same model names and tensors are served by `tensorrt_plan` or `onnxruntime_onnx` configs.
"""

from __future__ import annotations

import json

from dart_triton import specs
from dart_triton.runtime import OrtGraph
from dart_triton.triton import pb


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = pb.model_params(args)
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.max_classes = int(params.get("max_classes", specs.DEFAULT_MAX_CLASSES))
        threads = int(params.get("ort_threads", "0") or 0)
        self.graph = OrtGraph(pb.version_dir(args) / params.get("graph", "model.onnx"), threads)
        if self.graph.output_names != self.output_names:
            raise ValueError(f"graph outputs {self.graph.output_names} != config "
                             f"{self.output_names}")

    def _run(self, request) -> list:
        inputs = {name: pb.as_numpy(pb.required_input(request, name))
                  for name in self.input_names}
        text = inputs.get(specs.TEXT_FEATURES)
        if text is not None and not 1 <= text.shape[0] <= self.max_classes:
            raise ValueError(f"enc_dec decodes 1 to {self.max_classes} prompts per pass, "
                             f"got {text.shape[0]}")
        outputs = self.graph(**inputs)
        return [pb.pb_utils.Tensor(n, v) for n, v in zip(self.output_names, outputs,
                                                         strict=True)]

    def execute(self, requests):
        return pb.respond(requests, self._run)
