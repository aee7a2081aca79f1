import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from dart_triton.contract import specs
from dart_triton.contract.validation import check_classes, decode_class_names
from dart_triton.model.text_encoder import TextEncoder, cache_index_path, read_vocabulary


@pytest.fixture()
def encoder(parts):
    return TextEncoder.from_sam3(parts.model, parts.tokenizer, cache_size=3)


def test_features_match_sam3(encoder, parts):
    import torch

    feats, mask = encoder.encode(["person", "a red car"])
    tok = parts.tokenizer(["person", "a red car"], padding="max_length", max_length=32,
                          return_tensors="pt")
    with torch.no_grad():
        ref = parts.model.get_text_features(**tok).pooler_output.numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-6)
    assert feats.shape == (2, 32, parts.dims.text_dim) and feats.dtype == np.float32
    np.testing.assert_array_equal(mask, tok["attention_mask"].numpy())
    assert mask.dtype == np.int32


def test_repeated_names_are_hits(encoder):
    first = encoder.encode(["cat", "dog"])
    assert (encoder.stats.hits, encoder.stats.misses) == (0, 2)
    second = encoder.encode(["dog", "cat", "dog"])
    assert (encoder.stats.hits, encoder.stats.misses) == (3, 2)
    np.testing.assert_array_equal(second[0][1], first[0][0])


def test_lru_eviction(encoder):
    encoder.encode(["a", "b", "c"])
    encoder.encode(["a"])  # refresh a
    encoder.encode(["d"])  # evicts b, the least recently used
    misses = encoder.stats.misses
    encoder.encode(["a", "c", "d"])
    assert encoder.stats.misses == misses
    encoder.encode(["b"])
    assert encoder.stats.misses == misses + 1 and encoder.stats.size == 3


def test_cache_file_round_trip(parts, tmp_path):
    names = read_vocabulary("dart_triton/assets/coco80.txt")
    assert len(names) == 80
    enc = TextEncoder.from_sam3(parts.model, parts.tokenizer)
    path = enc.save_cache(tmp_path / "coco.safetensors", names)
    index = json.loads(cache_index_path(path).read_text())
    assert index["names"] == names and index["fingerprint"] == enc.fingerprint
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle or zip
    fresh = TextEncoder.from_sam3(parts.model, parts.tokenizer)
    assert fresh.load_cache(path) == 80
    feats, _ = fresh.encode(names)
    assert fresh.stats.misses == 0
    np.testing.assert_array_equal(feats, enc.encode(names)[0])


def test_cache_file_from_other_weights_is_refused(parts, tiny_checkpoint_b, tmp_path):
    path = TextEncoder.from_sam3(parts.model, parts.tokenizer).save_cache(
        tmp_path / "c.safetensors", ["cat"])
    other = TextEncoder.from_checkpoint(tiny_checkpoint_b)
    with pytest.raises(ValueError, match="different text-encoder weights"):
        other.load_cache(path)


def test_save_and_load_pretrained(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "te")
    again = TextEncoder.from_pretrained(tmp_path / "te")
    np.testing.assert_allclose(again.encode(["bus"])[0], encoder.encode(["bus"])[0], atol=1e-6)


@pytest.mark.parametrize("names, message", [([], "empty"), (["ok", ""], r"CLASSES\[1\]")])
def test_bad_names(encoder, names, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode(names)


def test_cache_is_bounded_in_bytes(parts):
    probe = TextEncoder.from_sam3(parts.model, parts.tokenizer)
    probe.encode(["cat"])
    per_entry = probe.stats.bytes  # features + mask + the name's 3 bytes
    assert per_entry > 3
    enc = TextEncoder.from_sam3(parts.model, parts.tokenizer, cache_size=100,
                                cache_bytes=2 * per_entry + 10)
    enc.encode(["dog", "cat", "owl"])  # 3 entries of per_entry bytes: the oldest goes
    assert enc.stats.size == 2 and enc.stats.bytes <= enc.cache_bytes
    misses = enc.stats.misses
    enc.encode(["cat", "owl"])
    assert enc.stats.misses == misses
    enc.encode(["dog"])  # evicted by bytes, not by count
    assert enc.stats.misses == misses + 1
    enc.encode(["a much longer class name"])  # more bytes: two entries no longer fit
    assert enc.stats.size == 1 and enc.stats.bytes <= enc.cache_bytes


class PickleBomb:
    """Unpickling one creates `marker`: what np.load(..., allow_pickle=True) would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_pickle_npz(path: Path, marker: Path) -> Path:
    np.savez(path, names=np.array([PickleBomb(marker)], dtype=object))
    return path


def test_the_pickle_bomb_is_real(tmp_path):
    """The refusal tests mean something: loading this file the old way does run code."""
    path = write_pickle_npz(tmp_path / "text_cache.npz", tmp_path / "ran")
    np.load(path, allow_pickle=True)["names"]
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("case", ["npz", "pickle as safetensors", "no index", "bad index",
                                  "truncated", "wrong shape"])
def test_unusable_cache_files_are_refused(parts, tmp_path, case):
    enc = TextEncoder.from_sam3(parts.model, parts.tokenizer)
    good = enc.save_cache(tmp_path / "good.safetensors", ["cat", "dog"])
    marker = tmp_path / "pwned"
    path = tmp_path / "cache.safetensors"
    cache_index_path(path).write_text(cache_index_path(good).read_text())
    if case == "npz":
        path = write_pickle_npz(tmp_path / "text_cache.npz", marker)
        match = "old .npz caches are not read"
    elif case == "pickle as safetensors":
        path.write_bytes(pickle.dumps(PickleBomb(marker)))
        match = "not a readable safetensors file"
    elif case == "no index":
        path.write_bytes(good.read_bytes())
        cache_index_path(path).unlink()
        match = "not a readable text-cache index"
    elif case == "bad index":
        path.write_bytes(good.read_bytes())
        cache_index_path(path).write_text(json.dumps({"format": "something else"}))
        match = "is not a dart-text-cache/1 index"
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[:-100])
        match = "not a readable safetensors file"
    else:  # the index lists three names for two rows
        path.write_bytes(good.read_bytes())
        index = json.loads(cache_index_path(good).read_text())
        index["names"].append("owl")
        cache_index_path(path).write_text(json.dumps(index))
        match = "for the 3 names of its index"
    with pytest.raises(ValueError, match=match):
        enc.load_cache(path)
    assert not marker.exists()


def test_class_name_length_limit(encoder, monkeypatch):
    limit = specs.MAX_CLASS_NAME_BYTES
    assert limit == 1024  # 32 CLIP tokens x 32 bytes (CLIP's longest BPE token)
    ok = "é" * (limit // 2)  # 2 bytes per character: exactly at the limit
    assert check_classes(["cat", ok]) == ["cat", ok]
    assert decode_class_names([b"cat", ok.encode()]) == ["cat", ok]
    message = rf"CLASSES\[1\] is {limit + 2} bytes long; a class name is at most {limit} bytes"
    with pytest.raises(ValueError, match=message):
        check_classes(["cat", ok + "é"])
    with pytest.raises(ValueError, match=message):
        decode_class_names([b"cat", (ok + "é").encode()])
    # 10 MB: refused at once, and the text encoder never runs.
    monkeypatch.setattr(encoder, "_compute", lambda names: pytest.fail("reached the model"))
    huge = "x" * 10_000_000
    for call in (lambda: encoder.encode(["cat", huge]),
                 lambda: decode_class_names([b"cat", huge.encode()])):
        with pytest.raises(ValueError, match=r"CLASSES\[1\] is 10000000 bytes long"):
            call()
    assert encoder.stats.misses == 0


def test_client_refuses_long_names_before_sending():
    from dart_triton.client.triton_client import DartClient

    # Nothing listens on port 9: the ValueError must come before any network use.
    with DartClient("127.0.0.1:9") as client, pytest.raises(ValueError, match="bytes long"):
        client.detect(np.zeros((8, 8, 3), np.uint8), ["x" * (specs.MAX_CLASS_NAME_BYTES + 1)])
