"""The command line as a new user tries it: every mistake gets one line naming the file or
option, exit 2 for a usage error, 1 for a runtime failure, and never a traceback.

Usage errors are checked against a closed port (127.0.0.1:9): had any request been
attempted, the line would be about the server instead. Runtime cases run against the
session's real tritonserver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dart_triton.contract import specs
from tests.helpers import REPO_ROOT, run_cli

ROOT = REPO_ROOT
CLOSED = ["--url", "127.0.0.1:9"]


def _one_line(lines: list[str], *fragments: str) -> str:
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def detect(argv, capsys):
    from dart_triton.client.cli import detect_main

    return run_cli(detect_main, argv, capsys)


def video(argv, capsys):
    from dart_triton.client.video_cli import video_main

    return run_cli(video_main, argv, capsys)


@pytest.fixture()
def images(tmp_path, photo) -> dict[str, Path]:
    """a.jpg and b.png (real photo crops), corrupt.jpg (a JPEG cut in half), junk.jpg, and
    cut.tif (a TIFF cut after 100 bytes: Pillow also warns "Truncated File Read")."""
    names = ("a.jpg", "b.png", "corrupt.jpg", "junk.jpg", "cut.tif")
    paths = {name: tmp_path / name for name in names}
    Image.fromarray(photo[:300, :260]).save(paths["a.jpg"], quality=90)
    Image.fromarray(photo[100:, 150:]).save(paths["b.png"])
    data = paths["a.jpg"].read_bytes()
    paths["corrupt.jpg"].write_bytes(data[: len(data) // 2])
    paths["junk.jpg"].write_bytes(b"these bytes are not an image")
    Image.fromarray(photo[:64, :64]).save(paths["cut.tif"])
    paths["cut.tif"].write_bytes(paths["cut.tif"].read_bytes()[:100])
    return paths


@pytest.fixture()
def clip(tmp_path) -> Path:
    """A real 8-frame H.264 MP4."""
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as iio

    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with iio.get_writer(path, fps=5, codec="libx264", macro_block_size=2) as w:
        for _ in range(8):
            w.append_data(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    return path


# --- dart-triton, tiny-checkpoint, serve ---------------------------------------------------
def test_no_arguments_is_usage_on_stderr_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "dart_triton.cli"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: dart-triton COMMAND") and "detect" in proc.stderr
    # Asking for help is not a mistake.
    proc = subprocess.run([sys.executable, "-m", "dart_triton.cli", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dart-triton COMMAND")


def test_tiny_checkpoint_help_describes_every_option(capsys):
    from dart_triton.model.checkpoint import tiny_checkpoint_main

    code, out, _ = run_cli(tiny_checkpoint_main, ["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for described in ("OUT_DIR directory to write", "--seed SEED seed of the random weights",
                      "--variant {a,b", "tiny architecture"):
        assert described in text, described


def test_serve_help_loads_every_model_in_explicit_mode(capsys):
    from dart_triton.serving.serve import build_parser

    text = build_parser().format_help()
    assert "--load-model=*" in text
    assert "--load-model=dart," not in text  # loads `dart` alone: ready, yet every request fails



def test_serve_refuses_a_backend_the_server_lacks(tmp_path, capsys):
    """The committed reference repository is TensorRT; the bundled server has only the
    python backend: one line, exit 2, before anything starts (2.51 segfaults otherwise)."""
    from dart_triton.serving.binaries import bundled_tritonserver_dir, find_tritonserver
    from dart_triton.serving.serve import serve_main

    if bundled_tritonserver_dir() is None or find_tritonserver().parent.parent != \
            bundled_tritonserver_dir():
        pytest.skip("needs the tritonserver bundled in nvidia-pytriton (python backend only)")
    reference = REPO_ROOT / "model_repository"
    code, _, err = run_cli(serve_main, ["--model-repository", reference], capsys)
    assert code == 2
    _one_line(err, "backbone, enc_dec need the tensorrt backend", "python")

# --- detect: usage errors, before any request ----------------------------------------------
def test_detect_json_pointing_at_a_folder(images, tmp_path, capsys):
    for target in (tmp_path, f"{tmp_path}/new/"):
        code, _, err = detect([images["a.jpg"], "--classes", "cat", "--json", target, *CLOSED],
                              capsys)
        assert code == 2
        _one_line(err, "--json", str(target).rstrip("/"), "is a folder")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_detect_json_unwritable(images, tmp_path, capsys, where):
    target = images["a.jpg"] / "out.json" if where == "under_a_file" else Path("/proc/out.json")
    code, _, err = detect([images["a.jpg"], "--classes", "cat", "--json", target, *CLOSED],
                          capsys)
    assert code == 2
    _one_line(err, "--json", str(target))
    assert "is a file, not a folder" in err[0] or "cannot write there" in err[0]


def test_detect_annotate_mistakes(images, tmp_path, capsys):
    a, b = images["a.jpg"], images["b.png"]
    code, _, err = detect([a, "--classes", "cat", "--annotate", tmp_path / "out.xyz", *CLOSED],
                          capsys)
    assert code == 2
    _one_line(err, "--annotate", "out.xyz", "unknown image extension '.xyz'")

    code, _, err = detect([a, b, "--classes", "cat", "--annotate", tmp_path / "one.png",
                           *CLOSED], capsys)
    assert code == 2
    _one_line(err, "--annotate", "one.png", "2 images need a folder")

    # The images' own folder: annotating would overwrite the originals.
    code, _, err = detect([a, "--classes", "cat", "--annotate", f"{tmp_path}/", *CLOSED],
                          capsys)
    assert code == 2
    _one_line(err, "--annotate", "would overwrite the input file", "a.jpg")
    assert a.read_bytes() == images["a.jpg"].read_bytes()


def test_detect_classes_swallowing_an_image(images, capsys):
    a = images["a.jpg"]
    for argv in (["--classes", "cat", a], ["--classes", "cat", "not-here.png"]):
        code, _, err = detect([*argv, *CLOSED], capsys)
        assert code == 2
        _one_line(err, "--classes", "looks like a file path", "put the files before --classes")


def test_detect_classes_with_commas_and_after_double_dash(triton_server, images, tmp_path,
                                                          capsys):
    a = images["a.jpg"]
    url = ["--url", triton_server.grpc_url]
    code, out, err = detect([a, "--classes", "person,flag", *url], capsys)
    assert code == 0 and not err
    expected = json.loads(out)
    # `--` ends the class list, so images may follow it.
    code, out, _ = detect(["--classes", "person", "flag", *url, "--", a], capsys)
    assert code == 0 and json.loads(out) == expected

    code, _, err = detect([a, "--classes", "cat,,dog", *CLOSED], capsys)
    assert code == 2
    _one_line(err, "--classes", "empty name")


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--score-threshold", "2"], ["--score-threshold must be in [0, 1]"]),
    (["--nms-iou", "0"], ["--nms-iou must be in (0, 1]"]),
    (["--max-detections", "0"], ["--max-detections must be at least 1"]),
])
def test_detect_option_out_of_range(images, capsys, argv, fragments):
    code, _, err = detect([images["a.jpg"], "--classes", "cat", *argv, *CLOSED], capsys)
    assert code == 2
    _one_line(err, *fragments)


def test_detect_missing_image_and_no_image(tmp_path, capsys):
    code, _, err = detect([tmp_path / "nope.jpg", "--classes", "cat", *CLOSED], capsys)
    assert code == 2
    _one_line(err, "nope.jpg", "no such image file")
    code, _, err = detect(["--classes", "cat", *CLOSED], capsys)
    assert code == 2
    _one_line(err, "no IMAGE given")
    code, _, err = detect([tmp_path, "--classes", "cat", *CLOSED], capsys)
    assert code == 2
    _one_line(err, str(tmp_path), "is a folder")


def test_argparse_mistakes_are_one_line_too(images, capsys):
    code, _, err = detect([images["a.jpg"], "--classes", *CLOSED], capsys)
    assert code == 2
    _one_line(err, "dart-triton detect: error:", "--classes", "see dart-triton detect --help")


def test_server_down_is_one_line_exit_1(images, capsys):
    code, _, err = detect([images["a.jpg"], "--classes", "cat", *CLOSED], capsys)
    assert code == 1
    _one_line(err, "127.0.0.1:9", "no model 'dart' ready")


# --- detect: runtime, against the real server ---------------------------------------------
def test_detect_goes_on_past_a_bad_image(triton_server, images, tmp_path, capsys):
    from dart_triton.client import DartClient, load_image

    out = tmp_path / "results" / "out.json"
    argv = [images["a.jpg"], images["corrupt.jpg"], images["b.png"], images["junk.jpg"],
            images["cut.tif"], "--classes", "person", "flag", "--url", triton_server.grpc_url,
            "--json", out]
    code, stdout, err = detect(argv, capsys)
    assert code == 1
    assert len(err) == 3, err
    _one_line(err[:1], "skipped", str(images["corrupt.jpg"]), "truncated")
    _one_line(err[1:2], "skipped", str(images["junk.jpg"]), "not an image file")
    _one_line(err[2:], "skipped", str(images["cut.tif"]))
    records = json.loads(out.read_text())
    assert [(r["file_name"], r["image_id"]) for r in records] == [
        (str(images["a.jpg"]), 0), (str(images["b.png"]), 2)]
    with DartClient(triton_server.grpc_url) as client:
        for r in records:
            image = load_image(r["file_name"])
            assert (r["height"], r["width"]) == image.shape[:2]
            assert r["detections"] == client.detect(image, ["person", "flag"]).to_coco(
                r["image_id"])
    assert [line.split(":")[0] for line in stdout.splitlines()] == [
        str(images["a.jpg"]), str(images["b.png"])]


def test_detect_only_a_bad_image_writes_nothing(triton_server, images, tmp_path, capsys):
    out = tmp_path / "out.json"
    code, stdout, err = detect([images["corrupt.jpg"], "--classes", "cat", "--url",
                                triton_server.grpc_url, "--json", out], capsys)
    assert code == 1 and stdout == "" and not out.exists()
    _one_line(err, "skipped", str(images["corrupt.jpg"]))
    # As a user runs it (pytest would swallow Pillow's own "Truncated File Read" warnings).
    proc = subprocess.run([sys.executable, "-m", "dart_triton.cli", "detect", images["cut.tif"],
                           "--classes", "cat", "--url", triton_server.grpc_url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    _one_line(proc.stderr.splitlines(), "skipped", str(images["cut.tif"]))


def test_detect_annotate_new_folder(triton_server, images, tmp_path, capsys):
    pytest.importorskip("supervision")
    url = ["--url", triton_server.grpc_url]
    for chosen, folder in (([images["a.jpg"]], tmp_path / "out" / "one"),
                           ([images["a.jpg"], images["b.png"]], tmp_path / "out" / "two")):
        code, _, err = detect([*chosen, "--classes", "person", *url,
                               "--annotate", f"{folder}/"], capsys)
        assert code == 0, err
        assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in chosen)
        for p in chosen:
            assert Image.open(folder / p.name).size == Image.open(p).size


# --- video ---------------------------------------------------------------------------------
def test_video_usage_errors(images, clip, tmp_path, capsys):
    cases = [
        ([images["a.jpg"], "--out", tmp_path / "o.mp4"], ["a.jpg", "is a still image (JPEG)",
                                                          "dart-triton detect"]),
        ([clip, "--out", tmp_path / "o.xyz"], ["--out", "o.xyz", "neither a video file"]),
        ([clip, "--out", clip], ["--out", "would overwrite the input file"]),
        ([clip, "--out", images["a.jpg"] / "o.mp4"], ["--out", "is a file, not a folder"]),
        ([tmp_path / "gone.mp4", "--out", tmp_path / "o.mp4"], ["gone.mp4", "no such video"]),
        ([clip, "--out", tmp_path / "o.mp4", "--in-flight", "0"], ["--in-flight must be >= 1"]),
    ]
    for argv, fragments in cases:
        code, _, err = video([*argv, "--classes", "cat", *CLOSED], capsys)
        assert code == 2, (argv, err)
        _one_line(err, *fragments)
    assert not (tmp_path / "o.mp4").exists()


def test_video_unreadable_inputs(triton_server, clip, tmp_path, capsys):
    data = clip.read_bytes()
    cut, junk = tmp_path / "cut.mp4", tmp_path / "junk.mp4"
    cut.write_bytes(data[: len(data) // 2])
    junk.write_bytes(b"\0" * 1000)
    for src in (cut, junk):
        code, _, err = video([src, "--classes", "cat", "--out", tmp_path / "o.mp4",
                              "--url", triton_server.grpc_url], capsys)
        assert code == 1
        _one_line(err, str(src), "cannot read as a video")


def test_video_out_folder(triton_server, clip, tmp_path, capsys):
    """A folder --out gets one annotated JPEG per frame (issue 12)."""
    folder = tmp_path / "videos"
    code, out, err = video([clip, "--classes", "cat", "--out", f"{folder}/", "--max-frames",
                            "3", "--url", triton_server.grpc_url], capsys)
    assert code == 0, err
    assert out.startswith(f"{folder}: 3 frames")
    assert sorted(p.name for p in folder.iterdir()) == ["000001.jpg", "000002.jpg", "000003.jpg"]


def test_video_ffmpeg_starts_while_grpc_is_busy(clip, tmp_path, monkeypatch):
    """imageio-ffmpeg starts ffmpeg through fork() and a preexec_fn; with gRPC threads busy
    in this process the child died in 4 of 60 starts (broken pipe, or "Could not load meta
    information"). An in-process fake gRPC server keeps them busy."""
    import threading

    from dart_triton.client import DartClient
    from dart_triton.client.video import annotate_video
    from tests.unit.client.test_client import _grpc_server, _Recorder

    monkeypatch.delenv("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", raising=False)
    server, url = _grpc_server(_Recorder())
    stop = threading.Event()

    def hammer() -> None:
        frame = np.zeros((48, 64, 3), np.uint8)
        with DartClient(url) as busy:
            while not stop.is_set():
                for f in [busy.detect_async(frame, ["cat"]) for _ in range(4)]:
                    f.result()

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    try:
        with DartClient(url) as client:
            for k in range(15):  # a reader and a writer each: 30 ffmpeg starts
                stats = annotate_video(clip, tmp_path / f"out{k}.mp4",
                                       lambda f: client.detect_async(f, ["cat"]),
                                       max_frames=2, progress=False)
                assert stats.frames == 2
    finally:
        stop.set()
        thread.join(timeout=10)
        server.stop(None)


# --- the in-process pipeline ----------------------------------------------------------------
def test_pipeline_takes_read_only_images_without_warning(tiny_checkpoint, photo):
    from dart_triton.pipeline.detectors import DartPipeline

    image = np.asarray(Image.fromarray(photo))  # what np.asarray of a PIL image gives
    assert not image.flags.writeable
    pipeline = DartPipeline.from_checkpoint(tiny_checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_only = pipeline.detect(image, ["person", "flag"], score_threshold=0.0)
    assert not [w for w in caught if "not writable" in str(w.message)]
    writable = pipeline.detect(image.copy(), ["person", "flag"], score_threshold=0.0)
    assert len(read_only) and np.array_equal(read_only.boxes, writable.boxes)


# --- backends: repository_check and demo.sh ------------------------------------------------
def test_repository_check_names_models_and_missing_backend(python_repository, tmp_path):
    from dart_triton.export import server_check
    from dart_triton.serving import preflight as rc

    assert rc.backend_problem([python_repository]) is None
    problem = rc.backend_problem([ROOT / "model_repository"])  # TensorRT reference configs
    assert problem is not None and "\n" not in problem
    assert "backbone, enc_dec need the tensorrt backend" in problem
    assert "nvidia-pytriton has only: python" in problem
    # Explicit mode loading only python models is fine; `*` loads the TensorRT ones too.
    explicit = ["--model-control-mode=explicit", "--load-model", "preprocess"]
    assert rc.backend_problem([ROOT / "model_repository"], extra_args=explicit) is None
    assert rc.backend_problem([ROOT / "model_repository"],
                              extra_args=[*explicit, "--load-model=*"]) is not None

    # A tritonserver like NVIDIA's container: bin/tritonserver next to backends/<name>/.
    ngc = tmp_path / "tritonserver"
    (ngc / "bin").mkdir(parents=True)
    (ngc / "bin" / "tritonserver").write_text("#!/bin/sh\n")
    for name in ("python", "onnxruntime"):
        (ngc / "backends" / name).mkdir(parents=True)
        (ngc / "backends" / name / f"libtriton_{name}.so").write_bytes(b"")
    binary = ngc / "bin" / "tritonserver"
    assert rc.available_backends(binary) == {"python", "onnxruntime"}
    assert server_check.build_backend_problem("onnxruntime", binary) is None
    assert server_check.build_backend_problem("torch", binary) is None  # python models only
    assert "no tensorrt backend" in server_check.build_backend_problem("tensorrt", binary)
    assert server_check.build_backends("tensorrt") == {"python", "tensorrt"}


def test_repository_check_command_line(python_repository):
    cmd = [sys.executable, "-m", "dart_triton.serving.preflight"]
    ok = subprocess.run([*cmd, str(python_repository)], capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0 and ok.stderr == ""
    bad = subprocess.run([*cmd, str(ROOT / "model_repository")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2
    _one_line(bad.stderr.splitlines(), "tensorrt backend")


def test_demo_refuses_a_backend_the_local_server_cannot_load():
    from dart_triton.export.server_check import build_backend_problem

    if build_backend_problem("onnxruntime") is None:
        pytest.skip("this tritonserver has the onnxruntime backend: the demo would run")
    env = {**os.environ, "DART_BACKEND": "onnxruntime"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 2
    _one_line(proc.stderr.splitlines(), "DART_BACKEND=onnxruntime", "has no onnxruntime backend",
              "NVIDIA's Triton container")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True,
                          text=True, timeout=60, env={**env, "DART_BACKEND": "cuda"}, cwd=ROOT)
    assert proc.returncode == 2
    _one_line(proc.stderr.splitlines(), "DART_BACKEND=cuda", "unknown backend 'cuda'",
              "choose one of", "python")


# --- README material: the curl request -------------------------------------------------
# The two commands of the README's KServe JSON example, verbatim but for the address.
MAKE_REQUEST = """python -c 'import json, sys, numpy as np; from PIL import Image
a = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
json.dump({"inputs": [
    {"name": "IMAGE", "datatype": "UINT8", "shape": list(a.shape), "data": a.ravel().tolist()},
    {"name": "CLASSES", "datatype": "BYTES", "shape": [2], "data": ["person", "flag"]},
    {"name": "SCORE_THRESHOLD", "datatype": "FP32", "shape": [1], "data": [0.3]}]},
    open("request.json", "w"))' photo.png"""
CURL = ("curl -s -X POST http://127.0.0.1:8000/v2/models/dart/infer "
        "-H 'Content-Type: application/json' --data-binary @request.json")


def test_curl_kserve_json_request(triton_server, photo, tmp_path):
    from dart_triton.client import DartClient

    Image.fromarray(photo).save(tmp_path / "photo.png")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", MAKE_REQUEST], cwd=tmp_path, check=True, timeout=120, env=env)
    curl = CURL.replace("127.0.0.1:8000", triton_server.http_url)
    proc = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=True)
    outputs = {o["name"]: o for o in json.loads(proc.stdout)["outputs"]}
    assert outputs[specs.BOXES]["datatype"] == "FP32"
    boxes = np.array(outputs[specs.BOXES]["data"], np.float32).reshape(-1, 4)
    scores = np.array(outputs[specs.SCORES]["data"], np.float32)
    ids = np.array(outputs[specs.CLASS_IDS]["data"], np.int32)
    assert len(scores) > 0  # the tiny seed-0 model finds something in the photo at 0.3
    with DartClient(triton_server.http_url, "http") as client:
        expected = client.detect(photo, ["person", "flag"], score_threshold=0.3)
    np.testing.assert_array_equal(boxes, expected.boxes)
    np.testing.assert_array_equal(scores, expected.scores)
    np.testing.assert_array_equal(ids, expected.class_ids)


def test_empty_or_repeated_url_is_a_usage_error(images, clip, tmp_path, capsys):
    for argv, run in (([images["a.jpg"], "--classes", "cat"], detect),
                      ([clip, "--classes", "cat", "--out", tmp_path / "o.mp4"], video)):
        code, _, err = run([*argv, "--url", ""], capsys)
        assert code == 2
        _one_line(err, "--url is empty")
        code, _, err = run([*argv, "--url", "127.0.0.1:9", "--url", "127.0.0.1:9"], capsys)
        assert code == 2
        _one_line(err, "--url 127.0.0.1:9 is given twice")


def test_detect_sends_files_as_they_are(triton_server, images, tmp_path, capsys):
    """By default a JPEG or PNG goes as its bytes (IMAGE_BYTES): the same detections as its
    pixels (`--send pixels`), and the server decodes it."""
    url = ["--url", triton_server.grpc_url, "--score-threshold", "0"]
    results = {}
    for send in ("file", "pixels"):
        out = tmp_path / f"{send}.json"
        code, _, err = detect([images["a.jpg"], images["b.png"], "--classes", "person", "flag",
                               *url, "--send", send, "--json", out], capsys)
        assert code == 0, err
        results[send] = json.loads(out.read_text())
    assert results["file"] == results["pixels"]
    assert all(r["detections"] for r in results["file"])


def test_video_encodes_frames_as_jpeg(triton_server, clip, tmp_path, capsys):
    folder = tmp_path / "jpeg"
    code, out, err = video([clip, "--classes", "cat", "--out", f"{folder}/", "--max-frames",
                            "2", "--encode", "jpeg", "--jpeg-quality", "80", "--url",
                            triton_server.grpc_url], capsys)
    assert code == 0, err
    assert out.startswith(f"{folder}: 2 frames")
    code, _, err = video([clip, "--classes", "cat", "--out", tmp_path / "o.mp4",
                          "--encode", "jpeg", "--jpeg-quality", "100"], capsys)
    assert code == 2
    _one_line(err, "--jpeg-quality must be in 1..95")
