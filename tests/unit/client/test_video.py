"""`dart-triton video` end to end on the session's real tritonserver (tiny model: boxes are
meaningless but deterministic): tracking with frames in flight, a folder of frames, an HTTP
URL, a live stream that drops frames and is reopened, Ctrl-C, and the latency benchmark."""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import read_csv, run_cli

pytest.importorskip("av")
pytest.importorskip("trackers")
pytest.importorskip("supervision")

W, H = 160, 96


def video(argv, capsys):
    from dart_triton.client.video_cli import video_main

    return run_cli(video_main, argv, capsys)


def frames_of(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def mot_rows(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 40-frame H.264 traffic clip, 25 FPS."""
    from dart_triton.benchmarks.video_latency import traffic_frames, write_clip

    return write_clip(tmp_path_factory.mktemp("clip") / "traffic.mp4",
                      traffic_frames(40, W, H), fps=25)


@contextlib.contextmanager
def http_server(handler) -> str:
    """A loopback HTTP server on a free port, stopped on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# --- usage errors: one line, exit 2, no request (closed port) ---------------------------------
def test_usage_errors(clip, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    closed = ["--url", "127.0.0.1:9", "--url", "127.0.0.1:10"]  # --url repeats
    cases = [
        ([clip, "--out", tmp_path / "o.txt"], ["neither a video file", "folder of frames"]),
        ([empty, "--out", tmp_path / "o.mp4"], ["without image files"]),
        ([tmp_path / "gone", "--out", tmp_path / "o.mp4"], ["no such video file or folder"]),
        ([clip, "--out", tmp_path / "o.mp4", "--tracks", f"{tmp_path}/"], ["--tracks",
                                                                          "is a folder"]),
        ([clip, "--out", tmp_path / "o.mp4", "--tracks", tmp_path / "o.mp4"],
         ["is the --out file"]),
        ([clip, "--out", tmp_path / "o.mp4", "--reconnect", "-1"], ["--reconnect must be >= 0"]),
        ([clip, "--out", tmp_path / "o.mp4", "--url", "127.0.0.1:9"],
         ["--url 127.0.0.1:9 is given twice"]),
    ]
    for argv, fragments in cases:
        code, _, err = video([*argv, "--classes", "car", *closed], capsys)
        assert code == 2, (argv, err)
        assert len(err) == 1 and all(f in err[0] for f in fragments), (fragments, err)
    code, _, err = video([clip, "--out", tmp_path / "o.mp4", "--fps", "0", "--classes", "car"],
                         capsys)
    assert code == 2 and "--fps must be > 0" in err[0]


# --- a clip, tracked, two frames in flight ---------------------------------------------------
def test_tracked_clip_matches_an_independent_replay(triton_server, clip, tmp_path, capsys):
    """The MP4 has every frame at the clip's size; the MOT file is exactly what the same
    frames, detections and tracker give when replayed here one frame at a time."""
    from dart_triton.client import DartClient
    from dart_triton.client.tracking import MultiClassTracker, mot_lines

    out, tracks = tmp_path / "out.mp4", tmp_path / "tracks.txt"
    classes = ["car", "truck"]
    code, stdout, err = video([clip, "--classes", *classes, "--out", out, "--tracks", tracks,
                               "--in-flight", "2", "--url", triton_server.grpc_url,
                               "--no-progress"], capsys)
    assert code == 0, err
    written = frames_of(out)
    assert len(written) == 40 and written[0].shape == (H, W, 3)

    # Replay: the server's answers are deterministic; the tracker sees what the CLI saw
    # (boxes down to ByteTrack's low threshold; `high` = the server's default threshold).
    tracker = MultiClassTracker(classes, frame_rate=25, high=0.3)
    expected, boxes = [], 0
    with DartClient(triton_server.grpc_url) as client:
        for number, frame in enumerate(frames_of(clip), 1):
            tracked = tracker.update(client.detect(frame, classes, score_threshold=0.1))
            expected.append(mot_lines(number, tracked))
            boxes += len(tracked)
    text = tracks.read_text()
    assert boxes > 0 and text == "".join(expected)
    assert len(text.splitlines()) == boxes  # one line per tracked box
    assert "40 frames" in stdout and f"{boxes} tracked boxes" in stdout
    rows = mot_rows(tracks)
    assert all(len(r) == 10 and r[-2:] == ["-1", "-1"] for r in rows)
    assert {int(r[0]) for r in rows} <= set(range(1, 41))
    assert {int(r[7]) for r in rows} <= {0, 1}
    classes_of: dict[int, set[int]] = {}
    for r in rows:
        classes_of.setdefault(int(r[1]), set()).add(int(r[7]))
    assert all(len(c) == 1 for c in classes_of.values())  # IDs are unique across classes
    assert min(classes_of) == 1


# --- several inputs (cameras) into one server ------------------------------------------------
def test_two_inputs_one_tracked_video_and_mot_file_each(triton_server, clip, tmp_path, capsys):
    """`video a.mp4 b.mp4 --out DIR/ --track --tracks DIR/`: one MP4 and one MOT file per
    input, named after it (a second traffic.mp4 becomes traffic-2), each MOT file exactly
    what that input alone gives, frame by frame, with a tracker of its own."""
    from dart_triton.benchmarks.video_latency import traffic_frames, write_clip
    from dart_triton.client import DartClient
    from dart_triton.client.tracking import MultiClassTracker, mot_lines

    other = write_clip(tmp_path / "b" / "traffic.mp4",
                       list(traffic_frames(25, W, H, seed=3))[::-1], fps=25)
    out, classes = tmp_path / "out", ["car", "truck"]
    code, stdout, err = video([clip, other, "--classes", *classes, "--out", f"{out}/",
                               "--track", "--tracks", f"{out}/", "--in-flight", "3",
                               "--url", triton_server.grpc_url, "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "traffic-2.mp4", "traffic-2.txt", "traffic.mp4", "traffic.txt"]
    assert len(frames_of(out / "traffic.mp4")) == 40
    assert len(frames_of(out / "traffic-2.mp4")) == 25
    lines = stdout.splitlines()
    assert len(lines) == 2 and all("2 inputs" in line for line in lines)
    assert lines[0].startswith(f"{out / 'traffic.mp4'}: 40 frames")
    assert lines[1].startswith(f"{out / 'traffic-2.mp4'}: 25 frames")
    with DartClient(triton_server.grpc_url) as client:
        for src, name in ((clip, "traffic"), (other, "traffic-2")):
            tracker = MultiClassTracker(classes, frame_rate=25, high=0.3)
            expected = [mot_lines(n, tracker.update(client.detect(f, classes,
                                                                  score_threshold=0.1)))
                        for n, f in enumerate(frames_of(src), 1)]
            text = (out / f"{name}.txt").read_text()
            assert text and text == "".join(expected), name

    # Several inputs need folders; the refusal names the option.
    code, _, err = video([clip, other, "--classes", "car", "--out", tmp_path / "o.mp4",
                          "--url", triton_server.grpc_url], capsys)
    assert code == 2 and len(err) == 1 and "--out" in err[0] and "need a folder" in err[0]


def test_detect_streams_equals_one_request_per_frame(triton_server, clip):
    """DartClient.detect_streams: every stream's detections in its frame order, equal to
    detect() on each frame alone."""
    from dart_triton.client import DartClient

    frames = frames_of(clip)
    streams = [frames[:7], frames[10:14][::-1], [], frames[20:29]]
    with DartClient(triton_server.grpc_url) as client:
        got: dict[int, list] = {}
        for index, detections in client.detect_streams(streams, ["car"], in_flight=3):
            got.setdefault(index, []).append(detections)
        assert sorted(got) == [0, 1, 3]
        for index, stream in enumerate(streams):
            want = [client.detect(f, ["car"]) for f in stream]
            assert len(got.get(index, [])) == len(want)
            for a, b in zip(got.get(index, []), want, strict=True):
                np.testing.assert_array_equal(a.boxes, b.boxes)
                np.testing.assert_array_equal(a.scores, b.scores)
                np.testing.assert_array_equal(a.class_ids, b.class_ids)
                assert list(a.class_names) == list(b.class_names)


def test_several_urls_one_down(triton_server, clip, tmp_path, capsys):
    """--url twice, one of them closed: one warning line, every frame still annotated."""
    out = tmp_path / "two.mp4"
    code, stdout, err = video([clip, "--classes", "car", "--out", out, "--max-frames", "6",
                               "--url", "127.0.0.1:9", "--url", triton_server.grpc_url,
                               "--no-progress"], capsys)
    assert code == 0, err
    assert len(err) == 1 and "warning: no model 'dart' ready at 127.0.0.1:9" in err[0]
    assert len(frames_of(out)) == 6 and "6 frames" in stdout


def test_frames_folder_in_frames_folder_out(triton_server, clip, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames_of(clip)[:12], 1):  # unpadded: sorted as numbers
        Image.fromarray(frame).save(folder / f"f{i}.png")
    out = tmp_path / "annotated"
    code, stdout, err = video([folder, "--classes", "car", "--out", f"{out}/", "--track",
                               "--fps", "10", "--url", triton_server.grpc_url, "--no-progress"],
                              capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"{i:06d}.jpg" for i in range(1, 13)]
    assert Image.open(out / names[0]).size == (W, H)
    assert stdout.startswith(f"{out}: 12 frames")


def test_http_url(triton_server, clip, tmp_path, capsys):
    handler = functools.partial(_Quiet, directory=str(clip.parent))
    with http_server(handler) as base:
        out = tmp_path / "url.mp4"
        code, stdout, err = video([f"{base}/{clip.name}", "--classes", "car", "--out", out,
                                   "--max-frames", "10", "--url", triton_server.grpc_url,
                                   "--no-progress"], capsys)
        assert code == 0, err
        assert len(frames_of(out)) == 10 and "live" not in stdout
        code, _, err = video([f"{base}/missing.mp4", "--classes", "car", "--out", out,
                              "--url", triton_server.grpc_url], capsys)
        assert code == 1 and len(err) == 1 and "404" in err[0]


def _live_handler(jpegs: list[bytes], period: float):
    """Connection 1 sends the first half of the frames, connection 2 the rest (a camera
    that dropped out once), every later one gets 404 (the camera is gone)."""
    connections: list[int] = []
    lock = threading.Lock()

    class Live(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # no Content-Length: the body ends with the connection

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with lock:
                k = len(connections)
                connections.append(k)
            half = len(jpegs) // 2
            part = {0: jpegs[:half], 1: jpegs[half:]}.get(k)
            if part is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "video/x-motion-jpeg")
            self.end_headers()
            for data in part:
                self.wfile.write(data)
                self.wfile.flush()
                time.sleep(period)

    return Live, connections


def test_live_stream_drops_frames_and_is_reopened(triton_server, clip, tmp_path, capsys):
    """A live MJPEG stream: frames that arrive while requests are in flight are dropped and
    counted (written + dropped = sent), the stream is reopened once after it breaks, and
    giving up on it is one line and exit 1, with the outputs complete."""
    from PIL import Image

    jpegs = []
    for frame in frames_of(clip):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    handler, connections = _live_handler(jpegs, period=0.02)
    with http_server(handler) as base:
        out, tracks = tmp_path / "live.mp4", tmp_path / "live.txt"
        code, stdout, err = video([f"{base}/cam.mjpeg", "--live", "--reconnect", "1",
                                   "--classes", "car", "--out", out, "--tracks", tracks,
                                   "--in-flight", "2", "--url", triton_server.grpc_url,
                                   "--no-progress"], capsys)
    assert code == 1
    assert len(err) == 1 and "stream lost" in err[0] and "gave up after 1 reopen" in err[0]
    assert len(connections) == 3, (err, stdout)
    summary = stdout.strip().splitlines()[-1]
    written = int(summary.split(": ", 1)[1].split(" frames")[0])
    dropped = int(summary.split("live: ")[1].split(" frames dropped")[0])
    assert "reopened 1 times" in summary
    assert written + dropped == len(jpegs) and written >= 2
    assert len(frames_of(out)) == written
    assert all(1 <= int(r[0]) <= written for r in mot_rows(tracks))


def test_sigint_halfway_leaves_a_playable_mp4(triton_server, tmp_path):
    from dart_triton.benchmarks.video_latency import traffic_frames, write_clip

    src = write_clip(tmp_path / "long.mp4", traffic_frames(300, W, H), fps=25)
    out, tracks = tmp_path / "out.mp4", tmp_path / "tracks.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dart_triton.cli", "video", str(src), "--classes", "car",
         "--out", str(out), "--tracks", str(tracks), "--in-flight", "2", "--no-progress",
         "--url", triton_server.grpc_url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            rows = mot_rows(tracks) if tracks.exists() else []
            if rows and int(rows[-1][0]) >= 10:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted after" in lines[0], lines
    done = int(lines[0].split("interrupted after ")[1].split(" frames")[0])
    assert 10 <= done < 300
    written = frames_of(out)  # the index was written: the MP4 decodes
    assert len(written) == done and written[0].shape == (H, W, 3)
    rows = mot_rows(tracks)
    assert all(len(r) == 10 for r in rows) and int(rows[-1][0]) <= done


# --- the latency benchmark, tiny ---------------------------------------------------------------
def test_video_latency_smoke(triton_server, tmp_path, monkeypatch):
    from dart_triton.benchmarks import common, video_latency

    monkeypatch.setenv("DART_BENCH_CACHE", str(tmp_path / "cache"))
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    assert video_latency.main([
        "--config", "tiny", "--url", triton_server.grpc_url, "--frames", "3", "--warmup", "1",
        "--runs", "2", "--classes", "1", "2", "--in-flight", "1", "2", "--clip-size", "96x64",
        "--out", str(out), "--results", str(results)]) == 0
    rows = read_csv(out / "video_latency.csv")
    assert [(r["classes"], r["in_flight"]) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["runs"] == 2 and 0 < r["fps_min"] <= r["fps_median"] <= r["fps_max"]
               for r in rows)
    assert len(read_csv(out / "video_latency_runs.csv")) == 8
    assert (out / "video_latency.png").read_bytes()[:4] == b"\x89PNG"
    section = common.read_section(results, "video_latency")
    assert "- command:" in section and "--frames 3" in section and "|---" in section
    clips = list((tmp_path / "cache").glob("traffic-96x64-*.mp4"))
    assert len(clips) == 1 and len(frames_of(clips[0])) == 4
