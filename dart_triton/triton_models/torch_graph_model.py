"""backbone / enc_dec on the python backend as PyTorch modules (``--backend torch``).

The module comes from ``<version>/weights/`` (`dart_triton.graphs.torch_graphs`: safetensors, no
pickle). Precision, torch.compile mode and CUDA graphs are config parameters; compiling
and capturing (one CUDA graph per enc_dec bucket) happen here in `initialize`, so the
model reports ready only once it is fast. On a GPU instance the tensors stay on the GPU:
inputs arrive through DLPack (FORCE_CPU_ONLY_INPUT_TENSORS is off in the config) and
outputs leave as GPU tensors. `dart_graph_inputs_total{model, input, memory}` counts
where each input arrived, so a GPU-resident pipeline can be checked from the metrics.

A backbone built with ``--max-batch B`` (max_batch_size B, Triton's dynamic batcher)
gets the frames of several requests at once: they run as one call, and each request
gets its own rows back (a request that cannot be read is answered alone). enc_dec, in
such a repository, shares passes: the requests of a batch (a frame and its prompts each)
are packed into passes whose rows come from several frames (`shared_pass_binding`).
"""

from __future__ import annotations

import json

import torch

from dart_triton.contract import metrics, specs
from dart_triton.contract.parameters import TorchGraphParameters
from dart_triton.contract.passes import batch_buckets, check_pass_rows
from dart_triton.graphs.torch_graphs import WEIGHTS_DIR, TorchGraph, TorchSettings
from dart_triton.triton_models import pb
from dart_triton.triton_models.shared_pass_binding import respond_shared


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = pb.model_parameters(args, TorchGraphParameters)
        self.name = config["name"]
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        self.max_classes = params.max_classes
        self.batched = self.name == specs.BACKBONE and config.get("max_batch_size", 0) > 0
        self.shared = self.name == specs.ENC_DEC and config.get("max_batch_size", 0) > 0
        buckets = (batch_buckets(config["max_batch_size"]) if self.batched
                   else list(params.enc_dec_buckets) if self.name == specs.ENC_DEC else [])
        frames = batch_buckets(config["max_batch_size"]) if self.shared else []
        settings = TorchSettings.from_parameters(params)
        device = pb.device_of(args)
        if args.get("model_instance_kind") == "GPU" and device == "cpu":
            raise RuntimeError(f"{self.name}: a GPU instance, but PyTorch sees no CUDA device")
        self.graph = TorchGraph.from_weights(pb.version_dir(args) / WEIGHTS_DIR, self.name,
                                             device, settings)
        warmed = self.graph.warm_up(buckets, frames)
        compiled = ("ahead of time" if self.graph.compiled_ahead else "at load") if (
            settings.compile != "none") else "no"
        pb.log(f"{self.name}: ready on {device} ({settings.precision}, compile "
               f"{settings.compile} ({compiled}), CUDA graphs "
               f"{'on' if settings.cuda_graphs else 'off'}; warmed for N = {warmed}"
               + (f", shared passes of {frames} frames" if frames else "") + ")")
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

    def _read(self, name: str, tensor) -> torch.Tensor:
        self.input_counts[(name, "cpu" if tensor.is_cpu() else "gpu")].increment(1)
        return pb.as_torch(tensor)

    def _inputs(self, request) -> list[torch.Tensor]:
        inputs = [self._read(name, pb.required_input(request, name))
                  for name in self.input_names]
        if self.name == specs.ENC_DEC:
            check_pass_rows(inputs[1].shape[0], self.max_classes)
        elif self.name == specs.MASK_DECODER:  # as many prompts per call as in a pass
            check_pass_rows(inputs[-1].shape[0], self.max_classes)
        return inputs

    def _tensors(self, outputs) -> list:
        return [pb.from_torch(n, v.contiguous())
                for n, v in zip(self.output_names, outputs, strict=True)]

    def _run(self, request) -> list:
        return self._tensors(self.graph(*self._inputs(request)))

    def _run_batch(self, frames: list[torch.Tensor]) -> list[list]:
        """The frames of every request in one backbone call, split back per request."""
        sizes = [int(f.shape[0]) for f in frames]
        outputs = self.graph(torch.cat([f.to(frames[0].device) for f in frames]))
        return [self._tensors(rows)
                for rows in zip(*(o.split(sizes) for o in outputs), strict=True)]

    def execute(self, requests):
        with torch.no_grad():
            if self.shared:
                return respond_shared(
                    requests, self.graph, self.max_classes, self.output_names, self._read,
                    lambda name, rows: pb.from_torch(name, torch.stack(rows)))
            if self.batched and len(requests) > 1:
                return pb.respond_batch(requests, lambda r: self._inputs(r)[0],
                                        self._run_batch)
            return pb.respond(requests, self._run)
