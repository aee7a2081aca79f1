"""IMAGE_BYTES: an image file's bytes instead of pixels, on a real tritonserver.

The same decoded pixels give the same detections whichever form the image came in; a
file that is hostile (declares 60000x60000), damaged (truncated) or no image at all is
refused in one line, fast, and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import urllib.request
import zlib

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from dart_triton.client.images import load_image
from dart_triton.contract import specs
from dart_triton.contract.detections import Detections
from tests.helpers import REPO_ROOT
from tests.parity import assert_same

pytestmark = pytest.mark.server

CLASSES = ["person", "rocket", "flag"]
EVERY = {specs.SCORE_THRESHOLD: 0.0, specs.NMS_IOU: 1.0}  # every query: nothing hides
MODELS = [specs.DART, specs.DART_ENSEMBLE]


def _encode(photo: np.ndarray, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(photo).save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def files(photo, tmp_path_factory) -> dict[str, bytes]:
    """The photograph as JPEG, PNG and WebP files, and a JPEG stored sideways whose EXIF
    orientation (6: rotate 90° clockwise to view) puts it upright again."""
    small = photo[::2, ::2]  # 256 x 256: fast, still a photograph
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = np.ascontiguousarray(np.rot90(small[:, :200], k=1))  # 200 wide -> 200 tall
    return {
        "jpeg": _encode(small, "JPEG", quality=90),
        "png": _encode(small, "PNG"),
        "webp": _encode(small, "WEBP", quality=90),
        "exif-rotated jpeg": _encode(sideways, "JPEG", quality=90, exif=exif),
    }


def _inputs(image: np.ndarray | None, data: bytes | None, options=EVERY,
            names: list[str] = CLASSES):
    """IMAGE and/or IMAGE_BYTES, `names` as CLASSES, and `options`."""
    inputs = []
    if image is not None:
        inputs.append(grpcclient.InferInput(specs.IMAGE, list(image.shape), "UINT8"))
        inputs[-1].set_data_from_numpy(image)
    if data is not None:
        inputs.append(grpcclient.InferInput(specs.IMAGE_BYTES, [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([data], dtype=object))
    inputs.append(grpcclient.InferInput(specs.CLASSES, [len(names)], "BYTES"))
    inputs[-1].set_data_from_numpy(np.array([c.encode() for c in names], dtype=object))
    for name, value in options.items():
        dtype = "INT32" if name == specs.MAX_DETECTIONS else "FP32"
        inputs.append(grpcclient.InferInput(name, [1], dtype))
        inputs[-1].set_data_from_numpy(np.array([value], dtype=dtype.lower().replace(
            "fp", "float")))
    return inputs


def _detect(server, model: str, image=None, data=None) -> Detections:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer(model, _inputs(image, data))
    return Detections(*(result.as_numpy(n) for n in specs.DETECTION_OUTPUTS), tuple(CLASSES))


def _refusal(server, model: str, image=None, data=None) -> tuple[str, float]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    start = time.perf_counter()
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _inputs(image, data))
    elapsed = time.perf_counter() - start
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT", err.value
    message = err.value.message()
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message, elapsed


def _still_serving(server, photo) -> None:
    assert len(_detect(server, specs.DART, photo[::4, ::4].copy())) > 0


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("kind", ["jpeg", "png", "webp", "exif-rotated jpeg"])
def test_file_bytes_detect_as_their_pixels(triton_server, files, tmp_path, model, kind):
    path = tmp_path / "image"
    path.write_bytes(files[kind])
    pixels = load_image(path)  # what the client sends as IMAGE: EXIF orientation applied
    if kind == "exif-rotated jpeg":
        assert pixels.shape[:2] == (256, 200)  # upright again
    as_pixels = _detect(triton_server, model, pixels)
    as_file = _detect(triton_server, model, data=files[kind])
    assert len(as_pixels) > 0
    assert_same(as_file, as_pixels, side=256)


@pytest.mark.parametrize("model", MODELS)
def test_kserve_json_with_base64_file(triton_server, files, tmp_path, model):
    """Raw KServe v2 JSON over HTTP: the file as base64 text in a BYTES element."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(files["jpeg"])
    body = {"inputs": [
        {"name": specs.IMAGE_BYTES, "shape": [1], "datatype": "BYTES",
         "data": [base64.b64encode(files["jpeg"]).decode()]},
        {"name": specs.CLASSES, "shape": [len(CLASSES)], "datatype": "BYTES", "data": CLASSES},
        {"name": specs.SCORE_THRESHOLD, "shape": [1], "datatype": "FP32", "data": [0.0]},
        {"name": specs.NMS_IOU, "shape": [1], "datatype": "FP32", "data": [1.0]},
    ]}
    request = urllib.request.Request(
        f"http://{triton_server.http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        outputs = {o["name"]: o for o in json.loads(response.read())["outputs"]}
    got = Detections(
        np.array(outputs[specs.BOXES]["data"], np.float32).reshape(-1, 4),
        np.array(outputs[specs.SCORES]["data"], np.float32),
        np.array(outputs[specs.CLASS_IDS]["data"], np.int32), tuple(CLASSES))
    assert_same(got, _detect(triton_server, model, load_image(path)), side=256)


def _png_declaring(width: int, height: int, photo: np.ndarray) -> bytes:
    """A real 100 x 100 PNG whose header (IHDR, CRC fixed) declares width x height."""
    png = bytearray(_encode(photo[:100, :100], "PNG"))
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def _dart_stub_rss(server) -> int:
    stubs = [p for p in psutil.Process(server.process.pid).children(recursive=True)
             if any(a.startswith("dart_0_") for a in p.cmdline())]
    return sum(p.memory_info().rss for p in stubs)


@pytest.mark.parametrize("model", MODELS)
def test_decompression_bomb_is_refused_at_once(triton_server, photo, model):
    bomb = _png_declaring(60_000, 60_000, photo)
    rss = _dart_stub_rss(triton_server)
    times = []
    for _ in range(5):
        message, elapsed = _refusal(triton_server, model, data=bomb)
        times.append(elapsed)
        assert "IMAGE_BYTES" in message and "8192" in message, message
    assert sorted(times)[2] < 0.1, times  # the median: the header is all that is read
    assert _dart_stub_rss(triton_server) - rss < 50 << 20  # nothing was decoded
    _still_serving(triton_server, photo)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", ["truncated jpeg", "text file", "both IMAGE and IMAGE_BYTES",
                                  "neither", "two files"])
def test_bad_files_are_refused_in_one_line(triton_server, files, photo, model, case):
    if case == "truncated jpeg":
        message, _ = _refusal(triton_server, model, data=files["jpeg"][:2000])
        assert "could not be decoded" in message and "truncated" in message, message
    elif case == "text file":
        message, _ = _refusal(triton_server, model, data=b"name,score\nperson,0.9\n")
        assert "not a JPEG, PNG or WebP file" in message, message
    elif case == "both IMAGE and IMAGE_BYTES":
        message, _ = _refusal(triton_server, model, photo[:64, :64].copy(), files["png"])
        assert "exactly one of IMAGE" in message, message
    elif case == "neither":
        message, _ = _refusal(triton_server, model)
        assert "exactly one of IMAGE" in message, message
    else:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        inputs = _inputs(None, None)
        two = grpcclient.InferInput(specs.IMAGE_BYTES, [2], "BYTES")
        two.set_data_from_numpy(np.array([files["png"], files["png"]], dtype=object))
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, [two, *inputs])
        assert "IMAGE_BYTES" in err.value.message(), err.value.message()
    _still_serving(triton_server, photo)


def test_readme_curl_with_a_jpeg_file(triton_server, files, tmp_path):
    """The README's IMAGE_BYTES example, word for word but for the address."""
    import re
    import subprocess

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("An image file is smaller still"):]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    assert "IMAGE_BYTES" in commands and "base64 -w0 photo.jpg" in commands
    (tmp_path / "photo.jpg").write_bytes(files["jpeg"])
    proc = subprocess.run(["bash", "-c", commands.replace("127.0.0.1:8000",
                                                          triton_server.http_url)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True)
    outputs = {o["name"]: o for o in json.loads(proc.stdout)["outputs"]}
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    pixels = load_image(tmp_path / "photo.jpg")
    want = client.infer(specs.DART, _inputs(pixels, None, {}, ["person", "flag"]))
    for name in specs.DETECTION_OUTPUTS:
        np.testing.assert_array_equal(
            np.array(outputs[name]["data"]).reshape(want.as_numpy(name).shape),
            want.as_numpy(name))


def test_dart_client_sends_file_bytes(triton_server, files, tmp_path):
    """`DartClient.detect` takes a file's bytes as well as pixels (sync and async)."""
    from dart_triton.client import DartClient

    path = tmp_path / "photo.png"
    path.write_bytes(files["png"])
    with DartClient(triton_server.grpc_url) as client:
        pixels = client.detect(load_image(path), CLASSES, score_threshold=0.0)
        as_file = client.detect(files["png"], CLASSES, score_threshold=0.0)
        later = client.detect_async(files["png"], CLASSES, score_threshold=0.0).result()
    assert len(pixels) > 0
    for got in (as_file, later):
        np.testing.assert_array_equal(got.boxes, pixels.boxes)
        np.testing.assert_array_equal(got.scores, pixels.scores)
