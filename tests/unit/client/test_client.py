"""Client library tests; no Triton needed (an in-process fake speaks its gRPC and HTTP APIs)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from dart_triton.client.errors import DartClientError
from dart_triton.client.inputs import check_image, encode_classes, option_arrays
from dart_triton.client.pipeline import completed, in_order, interleaved
from dart_triton.contract import specs
from dart_triton.contract.detections import Detections


def _dets(boxes, scores, ids, names=("cat", "dog", "traffic light")) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(scores), np.array(ids), names)


# --- Detections ------------------------------------------------------------------------
def test_to_coco_xywh_names_and_category_mapping():
    d = _dets([[10, 20, 110, 70], [0.5, 1.5, 2.5, 3.5]], [0.9, 0.25], [2, 0])
    assert len(d) == 2
    assert d.names == ["traffic light", "cat"]
    assert d.labels() == ["traffic light 0.90", "cat 0.25"]
    coco = d.to_coco(42, category_ids=[1, 18, 10])
    assert coco == [
        {"image_id": 42, "category_id": 10, "category_name": "traffic light",
         "bbox": [10.0, 20.0, 100.0, 50.0], "score": 0.9},
        {"image_id": 42, "category_id": 1, "category_name": "cat",
         "bbox": [0.5, 1.5, 2.0, 2.0], "score": 0.25},
    ]
    # Without a mapping the class index is the category id; output is plain JSON.
    assert [r["category_id"] for r in d.to_coco(0)] == [2, 0]
    json.dumps(d.to_coco(0))


def test_detections_normalises_and_validates():
    empty = Detections(np.zeros(0), np.zeros(0), np.zeros(0), ["a"])  # flat [0] BOXES
    assert empty.boxes.shape == (0, 4) and empty.to_coco(1) == []
    assert len(Detections.empty(["a", "b"])) == 0
    with pytest.raises(ValueError, match="inconsistent"):
        _dets([[0, 0, 1, 1]], [0.5, 0.6], [0])
    with pytest.raises(ValueError, match="out of range"):
        _dets([[0, 0, 1, 1]], [0.5], [3])
    with pytest.raises(ValueError, match="category ids"):
        _dets([[0, 0, 1, 1]], [0.5], [0]).to_coco(0, category_ids=[1])


# --- input validation --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), r"(?i)uint8"),
        (np.zeros((8, 8), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((8, 8, 4), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 8, 3), np.uint8), "at least 8"),
        ([[[0, 0, 0]]], "numpy"),
        (np.zeros((specs.MAX_IMAGE_SIDE + 1, 8, 3), np.uint8), "at most"),
    ],
)
def test_bad_images_raise_value_error(image, match):
    with pytest.raises(ValueError, match=match):
        check_image(image)


def test_classes_and_options_validation():
    encoded = encode_classes(["cat", "hot dog", "café"])
    assert encoded.dtype == object and encoded[2] == "café".encode()
    for bad, match in [("cat", "single string"), ([], "empty"), (["ok", " "], "whitespace"),
                       (["x"] * (specs.MAX_REQUEST_CLASSES + 1), "at most")]:
        with pytest.raises(ValueError, match=match):
            encode_classes(bad)
    assert option_arrays(None, None, None) == {}
    given = option_arrays(0.1, None, 5)
    assert set(given) == {specs.SCORE_THRESHOLD, specs.MAX_DETECTIONS}
    assert given[specs.MAX_DETECTIONS].dtype == np.int32
    for kwargs in ({"score_threshold": 1.5}, {"nms_iou": 0.0}, {"max_detections": 0}):
        with pytest.raises(ValueError):
            option_arrays(**{"score_threshold": None, "nms_iou": None,
                             "max_detections": None, **kwargs})


def test_client_validates_before_sending():
    from dart_triton.client.triton_client import DartClient

    # Nothing listens on port 9: the ValueError must come before any network use.
    with DartClient("127.0.0.1:9") as client:
        with pytest.raises(ValueError, match=r"(?i)uint8"):
            client.detect(np.zeros((4, 4, 3), np.float64), ["cat"])
        with pytest.raises(ValueError, match="single string"):
            client.detect_async(np.zeros((4, 4, 3), np.uint8), "cat")
    with pytest.raises(ValueError, match="protocol"):
        DartClient(protocol="websocket")  # type: ignore[arg-type]


# --- in-order pipeline --------------------------------------------------------------------
def test_in_order_keeps_order_and_bounds_in_flight():
    pool = ThreadPoolExecutor(8)
    live, peak, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(random.uniform(0, 0.01))  # finish out of order
        with lock:
            live -= 1
        return i * i

    out = list(in_order(range(40), lambda i: pool.submit(work, i), in_flight=5))
    assert out == [(i, i * i) for i in range(40)]
    assert peak <= 5
    assert list(in_order([1, 2], completed, 1)) == [(1, 1), (2, 2)]
    with pytest.raises(ValueError):
        list(in_order([1], completed, 0))


def test_interleaved_shares_one_budget_round_robin():
    """Several streams, one budget: taken round robin, each stream's results in its order,
    never more than in_flight pending over them all, an empty or short stream leaves."""
    pool = ThreadPoolExecutor(8)
    live, peak, lock, submitted = 0, 0, threading.Lock(), []

    def work(item: tuple[int, int]) -> int:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        time.sleep(random.uniform(0, 0.01))
        with lock:
            live -= 1
        return item[0] * 100 + item[1]

    def submit(item: tuple[int, int]):
        submitted.append(item[0])
        return pool.submit(work, item)

    lengths = [5, 0, 12, 3]
    streams = [[(s, i) for i in range(n)] for s, n in enumerate(lengths)]
    out = list(interleaved(streams, submit, in_flight=4))
    assert peak <= 4 and len(out) == sum(lengths)
    for s, n in enumerate(lengths):
        assert [r for i, _, r in out if i == s] == [s * 100 + k for k in range(n)]
    assert submitted[:9] == [0, 2, 3] * 3  # round robin while all three have frames
    assert submitted[9:] == [0, 2, 0, 2] + [2] * 7
    with pytest.raises(ValueError):
        list(interleaved([[1]], completed, 0))


# --- drawing -------------------------------------------------------------------------------
def test_annotate_writes_png_with_drawn_boxes(tmp_path):
    pytest.importorskip("supervision")
    from dart_triton.client.draw import annotate
    from dart_triton.client.images import load_image, save_image

    image = np.full((240, 320, 3), 90, np.uint8)
    dets = _dets([[20, 30, 150, 200], [200, 50, 300, 120]], [0.9, 0.4], [0, 2])
    out_path = tmp_path / "sub" / "annotated.png"
    save_image(out_path, annotate(image, dets))
    drawn = load_image(out_path)
    assert drawn.shape == image.shape and (image == 90).all()  # input left untouched
    changed = (drawn != image).any(axis=2)
    assert changed[30:200, 20].any() and changed[50:120, 300].any()  # box edges
    assert not changed[220:, :].any()  # far from any box
    assert (annotate(image, Detections.empty(["a"])) == image).all()


def test_annotation_paths_file_or_directory(tmp_path):
    from pathlib import Path

    from dart_triton.client.cli import annotation_paths

    assert annotation_paths([Path("a/x.jpg")], tmp_path / "o.png") == [tmp_path / "o.png"]
    assert annotation_paths([Path("a/x.jpg")], tmp_path) == [tmp_path / "x.jpg"]
    assert annotation_paths([Path("a/x.jpg"), Path("b/y.jpg")], tmp_path / "d") == [
        tmp_path / "d" / "x.jpg", tmp_path / "d" / "y.jpg"]
    clash = annotation_paths([Path("a/x.jpg"), Path("b/x.jpg")], tmp_path)
    assert len(set(clash)) == 2


# --- video ---------------------------------------------------------------------------------
def test_annotate_video_in_order_with_injected_detector(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as iio

    from dart_triton.client.video import annotate_video

    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    levels = [20, 60, 100, 140, 180, 220]
    with iio.get_writer(src, fps=10, codec="libx264", macro_block_size=2) as w:
        for v in levels:
            w.append_data(np.full((96, 128, 3), v, np.uint8))

    seen: list[int] = []
    pool = ThreadPoolExecutor(4)

    def detect(frame: np.ndarray) -> Detections:
        seen.append(int(frame.mean()))
        time.sleep(random.uniform(0, 0.02))  # answers arrive out of order
        return _dets([[10, 10, 60, 80]], [0.8], [1])

    def submit(frame: np.ndarray) -> Future[Detections]:
        return pool.submit(detect, frame)

    stats = annotate_video(src, dst, submit, in_flight=3, max_frames=5, progress=False)
    assert stats.frames == 5 and stats.fps > 0 and "5 frames" in stats.summary()
    frames = [np.asarray(f) for f in iio.get_reader(dst)]
    assert len(frames) == 5 and frames[0].shape == (96, 128, 3)
    # Frame order survives out-of-order answers: background brightness still rises.
    background = [int(f[90:, 100:].mean()) for f in frames]
    assert background == sorted(background)
    assert all(abs(b - v) < 8 for b, v in zip(background, levels, strict=False))
    # Box edge drawn on every frame.
    assert all(np.abs(f[20:70, 10].astype(int) - f[90:, 100:].mean()).max() > 40
               for f in frames)


# --- a fake Triton, to check what DartClient puts on the wire --------------------------
def _fake_model(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One box per class, x1 = the image's first pixel so answers can be matched to frames."""
    classes = [c.decode() for c in inputs[specs.CLASSES].reshape(-1)]
    if "boom" in classes:
        raise ValueError("text encoder failed on 'boom'")
    if specs.IMAGE in inputs:
        image = inputs[specs.IMAGE]
    else:  # an image file sent as it is: decoded as the server decodes it
        import io

        image = np.asarray(Image.open(io.BytesIO(bytes(inputs[specs.IMAGE_BYTES][0]))))
    n = len(classes)
    if specs.MAX_DETECTIONS in inputs:
        n = min(n, int(inputs[specs.MAX_DETECTIONS][0]))
    x = float(image[0, 0, 0])
    boxes = np.array([[x, i, x + 10, i + 20] for i in range(n)], np.float32).reshape(-1, 4)
    outputs = {
        specs.BOXES: boxes,
        specs.SCORES: np.linspace(0.9, 0.5, n).astype(np.float32),
        specs.CLASS_IDS: np.arange(n, dtype=np.int32)[::-1].copy(),
    }
    if specs.RETURN_MASKS in inputs and bool(inputs[specs.RETURN_MASKS][0]):
        outputs[specs.MASKS] = fake_masks(boxes, image.shape[:2])
    return outputs


def fake_masks(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """MASKS as `dart` sends them: the COCO RLE counts of each box's pixels, clipped to the
    image, as a BYTES [K] tensor."""
    from dart_triton.client.masks import encode_mask

    counts = []
    for x1, y1, x2, y2 in np.round(boxes).astype(int).tolist():
        mask = np.zeros(size, dtype=bool)
        mask[max(y1, 0):y2, max(x1, 0):x2] = True
        counts.append(encode_mask(mask))
    return np.array(counts, dtype=object).reshape(-1)


def _raw(array: np.ndarray) -> bytes:
    """A tensor's bytes on the wire (BYTES tensors length-prefixed, as Triton sends them)."""
    from tritonclient.utils import serialize_byte_tensor

    if array.dtype == object:
        return serialize_byte_tensor(array).item() if array.size else b""
    return array.tobytes()


_CONFIG = {"name": "dart", "max_batch_size": 0, "parameters": {"imgsz": {"string_value": "644"}}}


class _Recorder:
    def __init__(self) -> None:
        self.requests: list[set[str]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.requests.append(set(inputs))
        time.sleep(random.uniform(0, 0.01))
        return _fake_model(inputs)


def _grpc_server(recorder: _Recorder, port: int = 0) -> tuple[object, str]:
    import grpc
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as svc
    from tritonclient.utils import (
        deserialize_bytes_tensor,
        np_to_triton_dtype,
        triton_to_np_dtype,
    )

    class Servicer(svc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ModelReady(self, request, context):
            return pb.ModelReadyResponse(ready=request.name == "dart")

        def ModelConfig(self, request, context):
            cfg = mc.ModelConfig(name=request.name, max_batch_size=0)
            cfg.parameters["imgsz"].string_value = "644"
            return pb.ModelConfigResponse(config=cfg)

        def ModelMetadata(self, request, context):
            return pb.ModelMetadataResponse(name=request.name, platform="python")

        def ModelInfer(self, request, context):
            arrays = {}
            for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
                if tensor.datatype == "BYTES":
                    arrays[tensor.name] = deserialize_bytes_tensor(raw)
                else:
                    dtype = triton_to_np_dtype(tensor.datatype)
                    arrays[tensor.name] = np.frombuffer(raw, dtype).reshape(tensor.shape)
            try:
                outputs = recorder.run(arrays)
            except ValueError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            response = pb.ModelInferResponse(model_name=request.model_name)
            for name, array in outputs.items():
                response.outputs.add(name=name, datatype=np_to_triton_dtype(array.dtype),
                                     shape=array.shape)
                response.raw_output_contents.append(_raw(array))
            return response

    server = grpc.server(ThreadPoolExecutor(8))
    svc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


def _http_server(recorder: _Recorder, port: int = 0) -> tuple[object, str]:
    from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, triton_to_np_dtype

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, code: int, body: bytes, header_len: int | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream" if header_len
                             else "application/json")
            if header_len is not None:
                self.send_header("Inference-Header-Content-Length", str(header_len))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/v2/health/live" or self.path == "/v2/models/dart/ready":
                self._send(200, b"")
            elif self.path == "/v2/models/dart/config":
                self._send(200, json.dumps(_CONFIG).encode())
            elif self.path == "/v2/models/dart":
                self._send(200, json.dumps({"name": "dart", "platform": "python"}).encode())
            else:
                self._send(400, json.dumps({"error": f"unknown model {self.path}"}).encode())

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            n = int(self.headers.get("Inference-Header-Content-Length", len(body)))
            header, offset, arrays = json.loads(body[:n]), n, {}
            for t in header["inputs"]:
                size = t["parameters"]["binary_data_size"]
                raw = body[offset:offset + size]
                offset += size
                if t["datatype"] == "BYTES":
                    arrays[t["name"]] = deserialize_bytes_tensor(raw)
                else:
                    dtype = triton_to_np_dtype(t["datatype"])
                    arrays[t["name"]] = np.frombuffer(raw, dtype).reshape(t["shape"])
            try:
                outputs = recorder.run(arrays)
            except ValueError as e:
                self._send(400, json.dumps({"error": str(e)}).encode())
                return
            raw = {k: _raw(v) for k, v in outputs.items()}
            meta = [{"name": k, "datatype": np_to_triton_dtype(v.dtype), "shape": list(v.shape),
                     "parameters": {"binary_data_size": len(raw[k])}}
                    for k, v in outputs.items()]
            head = json.dumps({"model_name": "dart", "outputs": meta}).encode()
            self._send(200, head + b"".join(raw.values()), len(head))

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture(params=["grpc", "http"])
def fake_url(request) -> Iterator[tuple[str, str, _Recorder]]:
    """(protocol, url, recorder) of a fake Triton serving `dart` on loopback."""
    recorder = _Recorder()
    if request.param == "grpc":
        server, url = _grpc_server(recorder)
        yield request.param, url, recorder
        server.stop(None)
    else:
        server, url = _http_server(recorder)
        yield request.param, url, recorder
        server.shutdown()


@pytest.fixture
def fake(fake_url) -> Iterator[tuple[object, _Recorder]]:
    from dart_triton.client.triton_client import DartClient

    protocol, url, recorder = fake_url
    with DartClient(url, protocol, concurrency=4) as client:
        yield client, recorder


def _frame(value: int) -> np.ndarray:
    return np.full((24, 32, 3), value, np.uint8)


def test_fake_server_detect_sends_only_given_options(fake):
    client, recorder = fake
    dets = client.detect(_frame(7), ["cat", "dog", "bird"])
    assert recorder.requests[-1] == {specs.IMAGE, specs.CLASSES}
    assert dets.class_names == ("cat", "dog", "bird")
    assert dets.class_ids.tolist() == [2, 1, 0] and dets.boxes[0].tolist() == [7, 0, 17, 20]
    dets = client.detect(_frame(7), ["cat", "dog", "bird"], score_threshold=0.1,
                         max_detections=2)
    assert recorder.requests[-1] == {specs.IMAGE, specs.CLASSES, specs.SCORE_THRESHOLD,
                                     specs.MAX_DETECTIONS}
    assert len(dets) == 2


def test_fake_server_errors_carry_server_message(fake):
    client, _ = fake
    with pytest.raises(DartClientError, match="text encoder failed on 'boom'"):
        client.detect(_frame(1), ["boom"])
    with pytest.raises(DartClientError, match="text encoder failed on 'boom'"):
        client.detect_async(_frame(1), ["boom"]).result()


def test_fake_server_stream_in_input_order(fake):
    client, recorder = fake
    values = list(range(0, 250, 10))
    results = list(client.detect_stream((_frame(v) for v in values), ["a", "b"], in_flight=4))
    assert [int(d.boxes[0, 0]) for d in results] == values
    assert len(recorder.requests) == len(values)


def test_fake_server_info_passthroughs(fake):
    from dart_triton.client.server_errors import config_parameter

    client, _ = fake
    assert client.is_ready()
    config = client.model_config()
    assert config["name"] == "dart" and config_parameter(config, "imgsz") == "644"
    assert config_parameter({"name": "x"}, "imgsz") is None
    assert client.model_metadata()["name"] == "dart"
    assert client.imgsz() == 644


def test_unreachable_server_is_a_client_error():
    from dart_triton.client.triton_client import DartClient

    for protocol in ("grpc", "http"):
        # A short deadline: by default a client waits minutes for a server to come back.
        with DartClient("127.0.0.1:9", protocol, timeout=5, retry_deadline=2) as client:
            assert not client.is_ready()
            with pytest.raises(DartClientError):
                client.detect(_frame(0), ["cat"])


def test_image_roundtrip_is_rgb(tmp_path):
    from dart_triton.client.images import load_image

    Image.new("L", (5, 4), 77).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8 and (image == 77).all()


# --- command line, against the fake server ---------------------------------------------
def test_cli_detect_json_and_annotations(fake_url, tmp_path, capsys):
    pytest.importorskip("supervision")
    from dart_triton.client.cli import detect_main

    protocol, url, _ = fake_url
    paths = []
    for i, value in enumerate((40, 90)):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (64, 48), (value, value, value)).save(paths[-1])
    server = ["--url", url, "--protocol", protocol]

    # One image: a COCO results list on stdout, annotated file where asked.
    assert detect_main([str(paths[0]), "--classes", "cat", "traffic light", *server,
                        "--annotate", str(tmp_path / "one.png")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [d["category_name"] for d in printed] == ["traffic light", "cat"]
    assert printed[0]["bbox"] == [40.0, 0.0, 10.0, 20.0]
    assert (np.asarray(Image.open(tmp_path / "one.png")) != 40).any()

    # Several images: a list with file names in --json, annotations in a directory.
    out_json, out_dir = tmp_path / "dets.json", tmp_path / "annotated"
    assert detect_main([*map(str, paths), "--classes", "cat", *server, "--max-detections", "1",
                        "--json", str(out_json), "--annotate", str(out_dir)]) == 0
    records = json.loads(out_json.read_text())
    assert [r["file_name"] for r in records] == [str(p) for p in paths]
    assert [r["detections"][0]["bbox"][0] for r in records] == [40.0, 90.0]
    assert sorted(p.name for p in out_dir.iterdir()) == ["img0.png", "img1.png"]

    # Server-side failures: message on stderr, exit status 1.
    assert detect_main([str(paths[0]), "--classes", "boom", *server]) == 1
    assert "text encoder failed" in capsys.readouterr().err


def test_cli_video_prints_fps(fake_url, tmp_path, capsys):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as iio

    from dart_triton.client.video_cli import video_main

    protocol, url, _ = fake_url
    src, dst = tmp_path / "in.mp4", tmp_path / "out.mp4"
    with iio.get_writer(src, fps=5, codec="libx264", macro_block_size=2) as w:
        for v in range(0, 200, 25):
            w.append_data(np.full((48, 64, 3), v, np.uint8))
    assert video_main([str(src), "--classes", "cat", "--out", str(dst), "--url", url,
                       "--protocol", protocol, "--in-flight", "3", "--max-frames", "6"]) == 0
    summary = capsys.readouterr().out
    assert "6 frames" in summary and "FPS" in summary
    # (imageio's reader reports len() = inf for MP4, so count by iterating)
    assert sum(1 for _ in iio.get_reader(dst)) == 6


def test_future_timeout_is_a_client_error():
    from dart_triton.client.triton_client import DetectionFuture

    never: Future[Detections] = Future()
    with pytest.raises(DartClientError, match="in time"):
        DetectionFuture(never.result, "somewhere:1").result(timeout=0.01)


# --- retries: a request the server could not take (UNAVAILABLE) is sent again -----------
def _failing(statuses: list[str | None]):
    """A call failing with each of ``statuses`` in turn (None: success), and its log."""
    calls: list[str | None] = []

    def call() -> str:
        status = statuses[len(calls)]
        calls.append(status)
        if status is not None:
            raise DartClientError(f"failed with {status}", status)
        return "answer"

    return call, calls


def test_retry_unavailable_backs_off_and_gives_up_after_the_last_retry():
    from dart_triton.client.server_errors import retry_unavailable

    sleeps: list[float] = []
    call, calls = _failing(["StatusCode.UNAVAILABLE", "503", "UNAVAILABLE", None])
    assert retry_unavailable(call, 3, 0.5, sleep=sleeps.append) == "answer"
    assert sleeps == [0.5, 1.0, 2.0] and len(calls) == 4

    sleeps.clear()
    call, calls = _failing(["UNAVAILABLE"] * 5)
    with pytest.raises(DartClientError, match="UNAVAILABLE"):
        retry_unavailable(call, 4, 1.0, backoff_max=3.0, sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 3.0, 3.0] and len(calls) == 5  # capped; 1 + 4 retries

    sleeps.clear()
    call, calls = _failing(["UNAVAILABLE"] * 3)  # an async attempt already failed once
    with pytest.raises(DartClientError):
        retry_unavailable(call, 3, 0.5, first=1, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 2.0] and len(calls) == 3  # the retries that were left


@pytest.mark.parametrize("status", ["StatusCode.INVALID_ARGUMENT", "400",
                                    "StatusCode.DEADLINE_EXCEEDED", "TIMEOUT", None])
def test_retry_unavailable_never_retries_other_failures(status):
    from dart_triton.client.server_errors import retry_unavailable

    sleeps: list[float] = []
    call, calls = _failing([status or "", None])
    with pytest.raises(DartClientError):
        retry_unavailable(call, 5, 0.1, sleep=sleeps.append)
    assert len(calls) == 1 and sleeps == []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_client_retries_until_a_late_server_answers(protocol):
    """Nothing listens at first (a restarting server): the request waits for it."""
    from dart_triton.client.triton_client import DartClient
    from dart_triton.serving.processes import free_port

    port, recorder = free_port(), _Recorder()
    with DartClient(f"127.0.0.1:{port}", protocol, retries=0) as client:
        with pytest.raises(DartClientError) as err:
            client.detect(_frame(1), ["cat"])
        assert err.value.status in {"StatusCode.UNAVAILABLE", "UNAVAILABLE"}

    started: list[object] = []
    make = _grpc_server if protocol == "grpc" else _http_server
    timer = threading.Timer(1.0, lambda: started.append(make(recorder, port)[0]))
    timer.start()
    try:
        with DartClient(f"127.0.0.1:{port}", protocol, retries=8, retry_backoff=0.1,
                        retry_backoff_max=0.8) as client:
            future = client.detect_async(_frame(5), ["cat", "dog"])  # sent while down
            dets = client.detect(_frame(7), ["cat", "dog"])
            assert dets.boxes[0].tolist() == [7, 0, 17, 20]
            assert future.result().boxes[0].tolist() == [5, 0, 15, 20]
            assert len(recorder.requests) == 2  # each answered once, after the server came
            # INVALID_ARGUMENT is the server's final word: sent once, not retried.
            with pytest.raises(DartClientError, match="text encoder failed"):
                client.detect(_frame(1), ["boom"])
            assert len(recorder.requests) == 3
    finally:
        timer.join()
        for server in started:
            server.stop(None) if protocol == "grpc" else server.shutdown()


def test_client_refuses_negative_retries():
    from dart_triton.client.triton_client import DartClient

    with pytest.raises(ValueError, match="retries"):
        DartClient("127.0.0.1:1", retries=-1)


# --- several servers: round robin, a failing one set aside (issue 14) ------------------------
class _Live(_Recorder):
    """A fake server's recorder that counts the requests in flight over all servers sharing
    ``live``; once ``dead`` it drops every connection (HTTP) without an answer."""

    def __init__(self, live: list[int], lock: threading.Lock) -> None:
        super().__init__()
        self.live, self.lock, self.dead, self.refused = live, lock, False, 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.dead:
            self.refused += 1
            raise ConnectionAbortedError("fake server crashed")  # HTTP: connection closed
        with self.lock:
            self.live[0] += 1
            self.live[1] = max(self.live[1], self.live[0])
        try:
            return super().run(inputs)
        finally:
            with self.lock:
                self.live[0] -= 1


@pytest.fixture(params=["grpc", "http"])
def two_fakes(request) -> Iterator[tuple[str, list[str], list[_Live], list[int], Callable]]:
    """(protocol, urls, recorders, [in flight now, peak], kill(i)) of two fake Tritons."""
    live, lock = [0, 0], threading.Lock()
    recorders = [_Live(live, lock), _Live(live, lock)]
    make = _grpc_server if request.param == "grpc" else _http_server
    servers, urls = zip(*(make(r) for r in recorders), strict=True)
    stopped: set[int] = set()

    def kill(i: int) -> None:
        recorders[i].dead = True
        stopped.add(i)
        if request.param == "grpc":
            servers[i].stop(None)  # in-flight calls fail UNAVAILABLE, new ones are refused
        else:
            servers[i].shutdown()
            servers[i].server_close()

    yield request.param, list(urls), recorders, live, kill
    for i, server in enumerate(servers):
        if i not in stopped:
            server.stop(None) if request.param == "grpc" else server.shutdown()


def test_two_servers_share_a_stream_in_order_under_one_in_flight_limit(two_fakes):
    from dart_triton.client.triton_client import DartClient

    protocol, urls, recorders, live, _ = two_fakes
    values = list(range(0, 240, 6))
    with DartClient(urls, protocol, concurrency=4) as client:
        assert client.urls == tuple(urls) and client.url == ",".join(urls)
        assert client.is_ready() and client.imgsz() == 644
        results = list(client.detect_stream((_frame(v) for v in values), ["a"], in_flight=3))
    assert [int(d.boxes[0, 0]) for d in results] == values
    assert [len(r.requests) for r in recorders] == [20, 20]  # round robin
    assert live[1] <= 3  # in flight over both servers together
    with DartClient(",".join(urls), protocol) as client:  # one string, comma-separated
        assert client.urls == tuple(urls)
    with DartClient([urls[1], urls[0], urls[1]], protocol) as client:
        assert client.urls == (urls[1], urls[0])  # listed twice, one server
    with pytest.raises(ValueError, match="empty"):
        DartClient([urls[0], ""], protocol)


def test_a_dead_server_is_set_aside_and_its_requests_go_to_the_other(two_fakes):
    from dart_triton.client.triton_client import DartClient

    protocol, urls, recorders, _, kill = two_fakes
    values = list(range(0, 250, 5))

    def frames() -> Iterator[np.ndarray]:
        for n, v in enumerate(values):
            if n == 20:
                kill(0)  # with requests to it in flight
            yield _frame(v)

    # Set aside for 60 s: after the crash no new request is sent to server 0.
    with DartClient(urls, protocol, concurrency=4, retry_backoff=60.0,
                    retry_backoff_max=60.0) as client:
        results = list(client.detect_stream(frames(), ["a"], in_flight=4))
        assert [int(d.boxes[0, 0]) for d in results] == values  # nothing lost, in order
        # Server 0 had 10 answered and at most 4 in flight (received, never answered).
        before = [len(r.requests) for r in recorders]
        assert before[0] + recorders[0].refused <= 14 and before[1] >= len(values) - 10
        assert [int(client.detect(_frame(v), ["a"]).boxes[0, 0]) for v in (1, 2, 3)] == [1, 2, 3]
        assert len(recorders[0].requests) == before[0]  # still set aside
        assert client.unready() == [urls[0]] and client.is_ready()

        # Both gone, retries off: the request fails after trying each server once.
        kill(1)
        with DartClient(urls, protocol, retries=0) as fresh:
            assert not fresh.is_ready() and fresh.unready() == urls
            with pytest.raises(DartClientError) as err:
                fresh.detect(_frame(1), ["a"])
        assert err.value.status in {"StatusCode.UNAVAILABLE", "UNAVAILABLE"}


def _grpc_draining() -> tuple[object, str, list[str]]:
    """A fake gRPC Triton answering every inference as a draining one does: NOT_FOUND."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc as svc

    asked: list[str] = []

    class Servicer(svc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            asked.append(request.model_name)
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: "
                          f"'{request.model_name}' has no available versions")

    server = grpc.server(ThreadPoolExecutor(2))
    svc.add_GRPCInferenceServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", asked


def test_a_server_without_the_model_passes_its_requests_on_only_when_there_are_others():
    """A draining Triton answers NOT_FOUND ("has no available versions") for seconds: with
    several servers its requests go elsewhere; with one, the request waits for the model to
    be back (a model loaded again after its stub died says the same), up to the deadline."""
    from dart_triton.client.triton_client import DartClient

    draining, draining_url, asked = _grpc_draining()
    recorder = _Recorder()
    good, good_url = _grpc_server(recorder)
    try:
        with DartClient(draining_url, retry_backoff=0.01, retry_deadline=0.5) as client:
            with pytest.raises(DartClientError, match="unknown model") as err:
                client.detect(_frame(1), ["a"])
            assert err.value.status == "StatusCode.NOT_FOUND" and len(asked) > 1
        asked.clear()
        with DartClient([draining_url, good_url], retry_backoff=60.0) as client:
            got = [client.detect(_frame(v), ["a"]).boxes[0, 0] for v in (3, 4)]
            got += [f.result().boxes[0, 0] for f in [client.detect_async(_frame(5), ["a"])]]
        assert got == [3, 4, 5] and len(recorder.requests) == 3
        assert asked == ["dart"]  # tried once, then set aside
    finally:
        draining.stop(None)
        good.stop(None)
