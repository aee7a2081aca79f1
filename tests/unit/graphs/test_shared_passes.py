"""Shared passes: the prompts of several frames in one enc_dec pass.

The packing rule (`plan_shared_passes`), the packing itself (`run_shared_passes`, on a
tiny ONNX graph that pools each row's own frame), and the python backend's batched
enc_dec model over it (Triton's utils module faked): each request of a batch gets what
it gets alone, only the outputs it asked for, as soon as its pass has run; a bad
request is answered alone, and a failing pass fails only the requests still waiting.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import tests.fakes.pb_utils as fake_pb_utils
from dart_triton.contract import specs
from dart_triton.contract.passes import plan_shared_passes
from dart_triton.graphs.runtime import OrtGraph
from dart_triton.graphs.shared_passes import Item, run_shared_passes
from tests.fakes.tiny_graphs import TINY, tiny_enc_dec

MAX_ROWS = 4


@pytest.mark.parametrize(("rows", "passes"), [
    ([1], [[0]]),
    ([1, 1, 1, 1, 1], [[0, 1, 2, 3], [4]]),
    ([3, 2, 2, 4, 1], [[0], [1, 2], [3], [4]]),  # whole requests, in arrival order
    ([4, 4], [[0], [1]]),
])
def test_requests_are_packed_whole_and_in_order(rows, passes):
    assert plan_shared_passes(rows, MAX_ROWS) == passes


@pytest.mark.parametrize("rows", [[0], [2, 5]])
def test_a_request_outside_one_to_max_rows_is_refused(rows):
    with pytest.raises(ValueError, match="1 to 4 prompts per request"):
        plan_shared_passes(rows, MAX_ROWS)


@pytest.fixture(scope="module")
def shared_graph(tmp_path_factory) -> OrtGraph:
    return OrtGraph(tiny_enc_dec(tmp_path_factory.mktemp("shared") / "enc_dec.onnx",
                                 frames=True))


def _items(count: int, seed: int = 0) -> list[Item]:
    rng = np.random.default_rng(seed)
    d, out = TINY, []
    for k in range(count):
        n = 1 + (k * 3) % MAX_ROWS
        mask = np.ones((n, d.text_len), np.int32)
        mask[:, d.text_len - 1 - k % 3:] = 0
        out.append(Item(rng.normal(size=(1, d.fpn_dim, d.feat_hw, d.feat_hw)).astype(np.float32),
                        rng.normal(size=(n, d.text_len, d.text_dim)).astype(np.float32), mask))
    return out


def _alone(graph: OrtGraph, item: Item) -> list[np.ndarray]:
    return graph(**{specs.FPN_FEATURES: item.features, specs.TEXT_FEATURES: item.text_features,
                    specs.TEXT_MASK: item.text_mask,
                    specs.FRAME_INDEX: np.zeros(len(item.text_features), np.int64)})


def test_each_frame_gets_its_rows_as_alone(shared_graph):
    items = _items(6)
    frames_per_call: list[int] = []

    def graph(features, text, mask, index):
        frames_per_call.append(features.shape[0])
        assert index.tolist() == sorted(index.tolist())  # rows stay in order
        return shared_graph(**{specs.FPN_FEATURES: features, specs.TEXT_FEATURES: text,
                               specs.TEXT_MASK: mask, specs.FRAME_INDEX: index})

    results = run_shared_passes(graph, items, MAX_ROWS)
    # rows 1, 4, 3, 2, 1, 4 -> passes [0], [1], [2], [3, 4], [5]: whole, in order
    rows = [len(it.text_features) for it in items]
    assert frames_per_call == [len(p) for p in plan_shared_passes(rows, MAX_ROWS)]
    assert max(frames_per_call) > 1  # some pass did hold several frames
    for item, got in zip(items, results, strict=True):
        for g, want in zip(got, _alone(shared_graph, item), strict=True):
            assert g.shape[0] == len(item.text_features)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def enc_dec_model(monkeypatch, tmp_path):
    """The python backend's enc_dec with shared passes (max_batch_size 4) over the graph."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    from dart_triton.triton_models import graph_model

    version = tmp_path / specs.ENC_DEC / "1"
    version.mkdir(parents=True)
    tiny_enc_dec(version / "model.onnx", frames=True)
    spec = specs.shared_enc_dec_spec(TINY)
    config = {"name": specs.ENC_DEC, "max_batch_size": 4,
              "input": [{"name": t.name} for t in spec.inputs],
              "output": [{"name": t.name} for t in spec.outputs],
              "parameters": {"max_classes": {"string_value": str(MAX_ROWS)}}}
    model = graph_model.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config),
                      "model_repository": str(tmp_path / specs.ENC_DEC), "model_version": "1"})
    assert model.shared
    return model


def _request(item: Item, requested: list[str] | None = None):
    return fake_pb_utils.Request([
        fake_pb_utils.Tensor(specs.FPN_FEATURES, item.features),
        fake_pb_utils.Tensor(specs.TEXT_FEATURES, item.text_features[None]),
        fake_pb_utils.Tensor(specs.TEXT_MASK, item.text_mask[None])], requested)


def test_a_batch_of_requests_shares_passes_and_a_bad_one_fails_alone(enc_dec_model,
                                                                        shared_graph):
    items = _items(3, seed=1)
    too_many = Item(items[0].features, np.repeat(items[0].text_features, MAX_ROWS + 1, 0)[
        :MAX_ROWS + 1], np.ones((MAX_ROWS + 1, TINY.text_len), np.int32))
    requests = [_request(items[0]), _request(too_many), _request(items[1], [specs.PRED_LOGITS]),
                _request(items[2])]
    responses = fake_pb_utils.answers(requests, enc_dec_model.execute(requests))
    assert responses[1].has_error()
    assert "1 to 4 prompts per pass" in responses[1].error().message()
    outputs = [t.name for t in specs.shared_enc_dec_spec(TINY).outputs]
    for response, item, names in ((responses[0], items[0], outputs),
                                  (responses[2], items[1], [specs.PRED_LOGITS]),
                                  (responses[3], items[2], outputs)):
        assert not response.has_error()
        assert [t.name() for t in response.output_tensors] == names
        want = dict(zip(outputs, _alone(shared_graph, item), strict=True))
        for t in response.output_tensors:
            assert t.as_numpy().shape == (1, *want[t.name()].shape)  # the request's one item
            np.testing.assert_allclose(t.as_numpy()[0], want[t.name()], rtol=1e-5, atol=1e-6)


def test_a_graph_without_a_frame_index_is_refused_for_shared_passes(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    from dart_triton.triton_models import graph_model

    version = tmp_path / specs.ENC_DEC / "1"
    version.mkdir(parents=True)
    tiny_enc_dec(version / "model.onnx")
    spec = specs.enc_dec_spec(TINY)
    config = {"name": specs.ENC_DEC, "max_batch_size": 4,
              "input": [{"name": t.name} for t in spec.inputs],
              "output": [{"name": t.name} for t in spec.outputs]}
    with pytest.raises(ValueError, match="has no frame_index input: rebuild"):
        graph_model.TritonPythonModel().initialize({
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path / specs.ENC_DEC), "model_version": "1"})


def test_requests_are_answered_pass_by_pass_and_a_failing_pass_fails_the_rest(
        enc_dec_model):
    """Four full requests (4 rows each: a pass each): each is answered before the next
    pass runs; the third pass fails, so the third and fourth requests get INTERNAL."""
    items = [Item(it.features, np.repeat(it.text_features[:1], MAX_ROWS, 0),
                  np.ones((MAX_ROWS, TINY.text_len), np.int32)) for it in _items(4, seed=2)]
    requests = [_request(it) for it in items]
    run, passes = enc_dec_model.graph, []

    def failing_third(**inputs):
        answered = [len(r.sender.sent) for r in requests]
        passes.append(answered)
        if len(passes) == 3:
            raise RuntimeError("CUDA error: out of memory")
        return run(**inputs)

    enc_dec_model.graph = failing_third
    assert enc_dec_model.execute(requests) is None  # answered through the senders
    assert passes == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    responses = fake_pb_utils.answers(requests, None)
    assert not responses[0].has_error() and not responses[1].has_error()
    for r in responses[2:]:
        assert r.has_error() and "out of memory" in r.error().message()
