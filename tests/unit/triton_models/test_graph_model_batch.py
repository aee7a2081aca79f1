"""The python backend's ONNX Runtime graph model with a batched backbone (--max-batch):
the frames of a dynamic batch run in one session call, each request gets its own rows
back, and a bad request is answered alone. Triton's utils module is faked."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import tests.fakes.pb_utils as fake_pb_utils
from dart_triton.contract import specs
from tests.fakes.tiny_graphs import TINY, tiny_backbone


@pytest.fixture
def graph_model(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    from dart_triton.triton_models import graph_model

    return graph_model


def _model(graph_model, tmp_path, frames: int | str, max_batch: int):
    """A backbone instance over a tiny graph, its session calls counted."""
    version = tmp_path / specs.BACKBONE / "1"
    version.mkdir(parents=True)
    tiny_backbone(version / "model.onnx", frames=frames)
    config = {"name": specs.BACKBONE, "max_batch_size": max_batch,
              "input": [{"name": specs.PIXEL_VALUES}], "output": [{"name": specs.FPN_FEATURES}],
              "parameters": {"ort_threads": {"string_value": "1"}}}
    model = graph_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config),
                      "model_repository": str(tmp_path / specs.BACKBONE), "model_version": "1"})
    calls: list[int] = []
    run = model.graph.session.run

    def counted(names, feed):
        calls.append(feed[specs.PIXEL_VALUES].shape[0])
        return run(names, feed)

    model.graph.session = type("Session", (), {"run": staticmethod(counted)})()
    return model, calls


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (1, 3, TINY.imgsz, TINY.imgsz)).astype(np.float32)
            for _ in range(n)]


def _request(pixels: np.ndarray | None):
    tensors = [] if pixels is None else [fake_pb_utils.Tensor(specs.PIXEL_VALUES, pixels)]
    return fake_pb_utils.Request(tensors)


def test_a_batch_runs_in_one_call_and_a_bad_request_alone(graph_model, tmp_path):
    model, calls = _model(graph_model, tmp_path, "frames", max_batch=4)
    assert model.batched
    frames = _frames(3)
    alone = [model.graph(**{specs.PIXEL_VALUES: f})[0] for f in frames]
    calls.clear()
    responses = model.execute([_request(frames[0]), _request(None), _request(frames[1]),
                               _request(frames[2])])
    assert calls == [3]  # one session call for the three readable frames
    assert responses[1].has_error() and "missing required input" in responses[1].error().message()
    for response, want in zip([responses[i] for i in (0, 2, 3)], alone, strict=True):
        assert not response.has_error()
        (got,) = response.output_tensors
        assert got.name() == specs.FPN_FEATURES
        np.testing.assert_allclose(got.as_numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_lone_request_and_a_one_frame_graph_run_per_request(graph_model, tmp_path):
    model, calls = _model(graph_model, tmp_path / "a", "frames", max_batch=4)
    model.execute([_request(_frames(1)[0])])
    assert calls == [1]
    # a graph exported for one frame (fixed) cannot take a batch: frame by frame
    model, calls = _model(graph_model, tmp_path / "b", 1, max_batch=4)
    assert not model.batched
    responses = model.execute([_request(f) for f in _frames(2)])
    assert calls == [1, 1] and not any(r.has_error() for r in responses)
