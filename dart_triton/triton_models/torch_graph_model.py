"""backbone / enc_dec on the python backend as PyTorch modules (``--backend torch``).

The module comes from ``<version>/weights/`` (`dart_triton.graphs.torch_graphs`: safetensors, no
pickle). Precision, torch.compile mode and CUDA graphs are config parameters; compiling
and capturing (one CUDA graph per enc_dec bucket) happen here in `initialize`, so the
model reports ready only once it is fast. On a GPU instance the tensors stay on the GPU:
inputs arrive through DLPack (FORCE_CPU_ONLY_INPUT_TENSORS is off in the config) and
outputs leave as GPU tensors. `dart_graph_inputs_total{model, input, memory}` counts
where each input arrived, so a GPU-resident pipeline can be checked from the metrics.
"""

from __future__ import annotations

import json

import torch

from dart_triton.contract import metrics, specs
from dart_triton.contract.parameters import TorchGraphParameters
from dart_triton.contract.passes import check_pass_rows
from dart_triton.graphs.torch_graphs import WEIGHTS_DIR, TorchGraph, TorchSettings
from dart_triton.triton_models import pb


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = pb.model_parameters(args, TorchGraphParameters)
        self.name = config["name"]
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.max_classes = params.max_classes
        buckets = list(params.enc_dec_buckets)
        settings = TorchSettings.from_parameters(params)
        device = pb.device_of(args)
        if args.get("model_instance_kind") == "GPU" and device == "cpu":
            raise RuntimeError(f"{self.name}: a GPU instance, but PyTorch sees no CUDA device")
        self.graph = TorchGraph.from_weights(pb.version_dir(args) / WEIGHTS_DIR, self.name,
                                             device, settings)
        warmed = self.graph.warm_up(buckets)
        compiled = ("ahead of time" if self.graph.compiled_ahead else "at load") if (
            settings.compile != "none") else "no"
        pb.log(f"{self.name}: ready on {device} ({settings.precision}, compile "
               f"{settings.compile} ({compiled}), CUDA graphs "
               f"{'on' if settings.cuda_graphs else 'off'}; warmed for N = {warmed})")
        family = pb.pb_utils.MetricFamily
        # The family must outlive its metrics: keep both on the instance.
        self.input_family = family(
            name=metrics.GRAPH_INPUTS,
            description="inputs received by the torch graph models, by memory (cpu/gpu)",
            kind=family.COUNTER)
        self.input_counts = {
            (name, memory): self.input_family.Metric(
                labels={"model": self.name, "input": name, "memory": memory})
            for name in self.input_names for memory in ("cpu", "gpu")}

    def _run(self, request) -> list:
        tensors = [pb.required_input(request, name) for name in self.input_names]
        for name, t in zip(self.input_names, tensors, strict=True):
            self.input_counts[(name, "cpu" if t.is_cpu() else "gpu")].increment(1)
        inputs = [pb.as_torch(t) for t in tensors]
        if self.name == specs.ENC_DEC:
            check_pass_rows(inputs[1].shape[0], self.max_classes)
        outputs = self.graph(*inputs)
        return [pb.from_torch(n, v) for n, v in zip(self.output_names, outputs, strict=True)]

    def execute(self, requests):
        with torch.no_grad():
            return pb.respond(requests, self._run)
