"""The python models' logic without a server: Triton's utils module is faked, BLS calls
run the other models in process. Covers what the CPU server cannot: the TensorRT bucket
padding path of `dart`."""

from __future__ import annotations

import asyncio
import json
import pickle
import sys
from dataclasses import replace

import numpy as np
import pytest

import tests.fakes.pb_utils as fake_pb_utils
from tests.tolerances import SCORE_ATOL


@pytest.fixture(scope="module")
def models(python_repository):
    sys.modules["triton_python_backend_utils"] = fake_pb_utils
    from dart_triton.triton_models import (
        dart_model,
        graph_model,
        postprocess_model,
        preprocess_model,
        text_encoder_model,
    )

    classes = {"preprocess": preprocess_model, "text_encoder": text_encoder_model,
               "backbone": graph_model, "enc_dec": graph_model,
               "postprocess": postprocess_model, "dart": dart_model}
    built = {}
    for name, module in classes.items():
        cfg_text = (python_repository / name / "config.pbtxt").read_text()
        instance = module.TritonPythonModel()
        instance.initialize(_args(python_repository, name, cfg_text))
        built[name] = instance
    fake_pb_utils.MODELS.clear()
    fake_pb_utils.MODELS.update(built)
    yield built
    sys.modules.pop("triton_python_backend_utils", None)


def _args(repo, name, cfg_text):
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(cfg_text, model_config_pb2.ModelConfig())
    return {"model_config": json.dumps(json_format.MessageToDict(
        cfg, preserving_proto_field_name=True)), "model_repository": str(repo / name),
        "model_version": "1", "model_instance_kind": "CPU"}


def _request(image, classes, **options):
    T = fake_pb_utils.Tensor
    tensors = [T("IMAGE", image), T("CLASSES", np.array([c.encode() for c in classes],
                                                         dtype=object))]
    dtypes = {"SCORE_THRESHOLD": np.float32, "NMS_IOU": np.float32, "MAX_DETECTIONS": np.int32}
    tensors += [T(k, np.array([v], dtypes[k])) for k, v in options.items()]
    return fake_pb_utils.Request(tensors)


def _run_dart(dart, request):
    response = asyncio.run(dart.execute([request]))[0]
    if response.has_error():
        raise ValueError(response.error().message())
    get = fake_pb_utils.get_output_tensor_by_name
    return [get(response, n).as_numpy() for n in ("BOXES", "SCORES", "CLASS_IDS")]


def test_dart_bls_matches_naive(models, naive, photo):
    classes = ["person", "rocket", "flag", "helmet", "sky", "glove"]
    boxes, scores, ids = _run_dart(models["dart"], _request(photo, classes))
    ref = naive.detect(photo, classes)
    np.testing.assert_array_equal(ids, ref.class_ids)
    np.testing.assert_allclose(boxes, ref.boxes, atol=0.05)


def test_tensorrt_buckets_pad_and_drop_rows(models, naive, photo):
    dart = models["dart"]
    # as `dart-triton build --backend tensorrt --buckets 1,2,4`
    dart.params = replace(dart.params, enc_dec_buckets=(1, 2, 4))
    try:
        fake_pb_utils.InferenceRequest.calls.clear()
        classes = ["person", "rocket", "flag", "helmet", "sky"]  # 4 + 1 -> buckets 4 and 1
        kw = dict(SCORE_THRESHOLD=0.0, NMS_IOU=1.0, MAX_DETECTIONS=100000)
        boxes, scores, ids = _run_dart(dart, _request(photo, classes, **kw))
        sizes = sorted(shapes["text_features"][0] for model, shapes in
                       fake_pb_utils.InferenceRequest.calls if model == "enc_dec")
        assert sizes == [1, 4]
        classes = ["person", "rocket", "flag"]  # 3 -> padded to bucket 4, row dropped
        fake_pb_utils.InferenceRequest.calls.clear()
        boxes, scores, ids = _run_dart(dart, _request(photo, classes, **kw))
        assert [s["text_features"][0] for m, s in fake_pb_utils.InferenceRequest.calls
                if m == "enc_dec"] == [4]
        ref = naive.detect(photo, classes, score_threshold=0.0, nms_iou=1.0,
                           max_detections=100000)
        assert set(ids.tolist()) == {0, 1, 2}
        np.testing.assert_allclose(np.sort(scores), np.sort(ref.scores), atol=SCORE_ATOL)
    finally:
        dart.params = replace(dart.params, enc_dec_buckets=())


def test_text_encoder_counts_cache_hits(models):
    te = models["text_encoder"]
    req = fake_pb_utils.Request([fake_pb_utils.Tensor(
        "CLASSES", np.array([b"zebra crossing", b"person"], dtype=object))])
    before_hits, before_misses = te.hits.value, te.misses.value
    te.execute([req])
    te.execute([req])
    assert te.misses.value - before_misses == 1  # "person" was warmed from coco80.txt
    assert te.hits.value - before_hits == 3


@pytest.mark.parametrize("classes, message", [
    ([], "CLASSES is empty"), (["ok", " "], "whitespace"),
])
def test_errors_are_responses_not_crashes(models, photo, classes, message):
    with pytest.raises(ValueError, match=message):
        _run_dart(models["dart"], _request(photo, classes))


def test_enc_dec_refuses_more_than_max(models):
    enc_dec = models["enc_dec"]
    n = enc_dec.max_classes + 1
    req = fake_pb_utils.Request([
        fake_pb_utils.Tensor("fpn_features", np.zeros((1, 32, 8, 8), np.float32)),
        fake_pb_utils.Tensor("text_features", np.zeros((n, 32, 32), np.float32)),
        fake_pb_utils.Tensor("text_mask", np.ones((n, 32), np.int32))])
    response = enc_dec.execute([req])[0]
    assert response.has_error() and "1 to 4 prompts" in response.error().message()


def _preprocess(models, tensors):
    response = models["preprocess"].execute([fake_pb_utils.Request(tensors)])[0]
    if response.has_error():
        raise ValueError(response.error().message())
    return {n: fake_pb_utils.get_output_tensor_by_name(response, n)
            for n in ("pixel_values", "original_size", "checked_classes")}


def test_preprocess_gates_the_whole_request_for_the_ensemble(models, photo):
    T = fake_pb_utils.Tensor
    names = np.array([b"person", b"rocket"], dtype=object)
    out = _preprocess(models, [T("IMAGE", photo), T("CLASSES", names)])
    assert out["original_size"].as_numpy().tolist() == list(photo.shape[:2])
    assert out["checked_classes"].as_numpy().tolist() == names.tolist()
    # IMAGE alone: refused by name (the image inputs are optional since IMAGE_BYTES, and
    # tritonserver 2.51 only counts inputs: preprocess must say what is missing).
    with pytest.raises(ValueError, match="missing required input CLASSES"):
        _preprocess(models, [T("IMAGE", photo)])
    with pytest.raises(ValueError, match=r"CLASSES\[1\] is not valid UTF-8"):
        _preprocess(models, [T("IMAGE", photo),
                             T("CLASSES", np.array([b"ok", b"\xff"], dtype=object))])
    with pytest.raises(ValueError, match="CLASSES is empty"):
        _preprocess(models, [T("IMAGE", photo), T("CLASSES", np.array([], dtype=object))])
    with pytest.raises(ValueError, match="NMS_IOU"):
        _preprocess(models, [T("IMAGE", photo), T("CLASSES", names),
                             T("NMS_IOU", np.array([0.0], np.float32))])


def test_failing_sub_model_is_internal_naming_it(models, photo, monkeypatch):
    """A called model's error is the server's problem: INTERNAL (UNAVAILABLE when the
    model is down), never INVALID_ARG, and the message names the model."""

    class Broken:
        def execute(self, requests):
            return [fake_pb_utils.InferenceResponse(error=fake_pb_utils.TritonError(
                "CUDA error: an illegal memory access", fake_pb_utils.TritonError.INTERNAL))]

    class Dead:
        def execute(self, requests):
            return [fake_pb_utils.InferenceResponse(error=fake_pb_utils.TritonError(
                "Stub process 'enc_dec_0_0' is not healthy.",
                fake_pb_utils.TritonError.INTERNAL))]

    dart = models["dart"]
    for model, stand_in, code in (("backbone", Broken(), "INTERNAL"),
                                  ("enc_dec", Dead(), "UNAVAILABLE")):
        monkeypatch.setitem(fake_pb_utils.MODELS, model, stand_in)
        before = dart.failures[code].value
        response = asyncio.run(dart.execute([_request(photo, ["person"])]))[0]
        monkeypatch.setitem(fake_pb_utils.MODELS, model, models[model])
        assert response.has_error()
        assert response.error().code() == getattr(fake_pb_utils.TritonError, code)
        assert f"model '{model}' failed" in response.error().message()
        assert dart.failures[code].value == before + 1


# --- input limits: the ensemble's gate, the text cache file -------------------------------


def test_preprocess_refuses_more_classes_than_the_ensemble_takes(models, photo):
    T = fake_pb_utils.Tensor
    limit = models["preprocess"].max_classes
    assert limit == models["enc_dec"].max_classes  # the config's max_classes: one pass
    names = np.array([f"class {i}".encode() for i in range(limit + 5)], dtype=object)
    message = (rf"^dart_ensemble takes at most {limit} classes per request \(got {limit + 5}\); "
               r"send larger class lists to the `dart` model, which splits them into passes$")
    with pytest.raises(ValueError, match=message):
        _preprocess(models, [T("IMAGE", photo), T("CLASSES", names)])
    # Before any other work: even a bad image and a bad option get this answer first.
    with pytest.raises(ValueError, match=message):
        _preprocess(models, [T("IMAGE", np.zeros((2, 2), np.float32)), T("CLASSES", names),
                             T("NMS_IOU", np.array([0.0], np.float32))])
    out = _preprocess(models, [T("IMAGE", photo), T("CLASSES", names[:limit])])
    assert len(out["checked_classes"].as_numpy()) == limit
    # Over the request limit of every model, the answer says so (`dart` would not help).
    too_many = np.array([b"x"] * 1025, dtype=object)
    with pytest.raises(ValueError, match=r"^CLASSES has 1025 names; at most 1024 per request$"):
        _preprocess(models, [T("IMAGE", photo), T("CLASSES", too_many)])


def _text_encoder_copy(python_repository, tmp_path):
    """A private copy of the built text_encoder model, to plant cache files in."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(python_repository / "text_encoder", repo / "text_encoder")
    return repo, repo / "text_encoder" / "1"


@pytest.mark.parametrize("case", ["old npz", "pickle as safetensors", "other weights"])
def test_text_encoder_refuses_a_bad_cache_and_rebuilds(models, python_repository, tmp_path,
                                                       capfd, case):
    from dart_triton.model.text_encoder import CACHE_FILE, cache_index_path
    from dart_triton.triton_models import text_encoder_model
    from tests.unit.model.test_text_encoder import PickleBomb, write_pickle_npz

    repo, version = _text_encoder_copy(python_repository, tmp_path)
    cache, marker = version / CACHE_FILE, tmp_path / "pwned"
    if case == "old npz":  # a build from before safetensors, with a crafted pickle in it
        cache.unlink()
        cache_index_path(cache).unlink()
        write_pickle_npz(version / text_encoder_model.LEGACY_CACHE_FILE, marker)
    elif case == "pickle as safetensors":
        cache.write_bytes(pickle.dumps(PickleBomb(marker)))
    else:
        index = json.loads(cache_index_path(cache).read_text())
        cache_index_path(cache).write_text(json.dumps({**index, "fingerprint": "0" * 16}))
    capfd.readouterr()
    model = text_encoder_model.TritonPythonModel()
    model.initialize(_args(repo, "text_encoder",
                           (repo / "text_encoder" / "config.pbtxt").read_text()))
    log = capfd.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert len(log) == 1 and log[0].startswith("text_encoder: refused the text cache: ")
    assert log[0].endswith("; rebuilding it from coco80.txt")
    # It loaded, warm: the vocabulary's names are hits, and it serves.
    request = fake_pb_utils.Request([fake_pb_utils.Tensor(
        "CLASSES", np.array([b"person", b"dog"], dtype=object))])
    response = model.execute([request])[0]
    assert not response.has_error()
    assert (model.hits.value, model.misses.value) == (2, 0)


def test_text_encoder_loads_the_built_cache_silently(models, capfd, python_repository):
    from dart_triton.model.text_encoder import CACHE_FILE, cache_index_path
    from dart_triton.triton_models import text_encoder_model

    version = python_repository / "text_encoder" / "1"
    assert (version / CACHE_FILE).is_file() and cache_index_path(version / CACHE_FILE).is_file()
    assert not (version / text_encoder_model.LEGACY_CACHE_FILE).exists()
    capfd.readouterr()
    model = text_encoder_model.TritonPythonModel()
    model.initialize(_args(python_repository, "text_encoder",
                           (python_repository / "text_encoder" / "config.pbtxt").read_text()))
    assert "refused" not in capfd.readouterr().err
    assert model.encoder.stats.size == 80
