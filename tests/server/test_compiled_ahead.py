"""`--backend torch --compile`: the graph modules compiled at build time (AOTInductor), shipped
in the repository and loaded at start without compiling; a package made for another
machine kind is reported stale and refused in one line, never run."""

from __future__ import annotations

import json

import pytest

from dart_triton.client import DartClient
from dart_triton.contract import specs
from dart_triton.graphs import aot
from dart_triton.graphs.torch_graphs import weights_dir
from tests.conftest import TEST_MAX_CLASSES
from tests.parity import NAMES, assert_same

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def compiled_repository(tiny_checkpoint, tmp_path_factory):
    from dart_triton.export.repository import build_repository

    repo = tmp_path_factory.mktemp("repo_torch_compiled")
    # --max-batch 2: the backbone's package takes 1 or 2 frames (a dynamic dimension).
    build_repository(tiny_checkpoint, repo, backend="torch", max_classes=TEST_MAX_CLASSES,
                     compile="default", max_batch=2, log=lambda *_: None)
    return repo


def test_the_backbone_package_takes_a_batch_of_frames(compiled_repository):
    """Two frames in one call of the compiled backbone give what each gives alone."""
    import torch

    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings

    graph = TorchGraph.from_weights(weights_dir(compiled_repository, specs.BACKBONE),
                                    specs.BACKBONE, "cpu", TorchSettings(compile="default"))
    assert graph.compiled_ahead
    s = graph.dims.imgsz
    frames = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    (together,) = graph(frames)
    alone = torch.cat([graph(frames[i:i + 1])[0] for i in range(2)])
    assert together.shape[0] == 2
    # float noise only: features reach ~100 here, relative error ~1e-6 (a few eps)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-2  # two frames, two answers


def test_packages_are_in_the_repository(compiled_repository):
    for name in specs.GRAPH_MODELS:
        weights = weights_dir(compiled_repository, name)
        assert aot.package_path(weights, name).is_file()
        assert aot.read_key(weights, name) == aot.machine_key("cpu")


def test_served_from_the_packages_equals_the_reference(compiled_repository, naive, photo):
    from dart_triton.serving.server import TritonServer

    with TritonServer(compiled_repository, startup_timeout=300) as server:
        log = server.log_text()
        for name in specs.GRAPH_MODELS:
            assert f"{name}: ready on cpu (fp32, compile default (ahead of time)" in log, name
        with DartClient(server.grpc_url) as client:
            for n in (1, 3):
                assert_same(client.detect(photo, NAMES[:n]), naive.detect(photo, NAMES[:n]))


def test_a_package_for_another_machine_is_stale_and_refused(compiled_repository, tmp_path,
                                                             tiny_checkpoint, capsys):
    import shutil

    from dart_triton.export.check import check_main
    from dart_triton.graphs.torch_graphs import TorchGraph, TorchSettings

    repo = tmp_path / "copied"
    shutil.copytree(compiled_repository, repo)
    weights = weights_dir(repo, specs.ENC_DEC)
    key = aot.key_path(weights, specs.ENC_DEC)
    key.write_text(json.dumps({**json.loads(key.read_text()), "cpu_isa": "neon"}))
    args = [str(repo), "--checkpoint", str(tiny_checkpoint), "--", "--backend", "torch",
            "--max-classes", str(TEST_MAX_CLASSES), "--compile", "default"]
    assert check_main(args) == 1  # stale: the container entrypoint rebuilds
    out = capsys.readouterr().out
    assert "stale: enc_dec: compiled for another machine (cpu_isa 'neon'" in out, out
    # What the served model does at load (initialize): refuse, in one line.
    with pytest.raises(aot.AotMismatch) as err:
        TorchGraph.from_weights(weights, specs.ENC_DEC, "cpu", TorchSettings(compile="default"))
    message = str(err.value)
    assert "\n" not in message and "compiled for another machine" in message
    assert "rebuild the repository" in message
