import numpy as np
import pytest

from dart_triton.text_encoder import TextEncoder, read_vocabulary


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
    path = enc.save_cache(tmp_path / "coco.npz", names)
    fresh = TextEncoder.from_sam3(parts.model, parts.tokenizer)
    assert fresh.load_cache(path) == 80
    feats, _ = fresh.encode(names)
    assert fresh.stats.misses == 0
    np.testing.assert_array_equal(feats, enc.encode(names)[0])


def test_cache_file_from_other_weights_is_refused(parts, tiny_checkpoint_b, tmp_path):
    path = TextEncoder.from_sam3(parts.model, parts.tokenizer).save_cache(tmp_path / "c.npz",
                                                                          ["cat"])
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
