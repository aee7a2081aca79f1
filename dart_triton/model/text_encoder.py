"""Class names -> text features, with an LRU embedding cache (DART §3.4).

The text encoder stays in PyTorch: a class set changes at run time (open vocabulary),
and a repeated set costs only a dictionary lookup. Features are SAM3's projected
token features ([N, 32, 256] for the real model) plus the token mask.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dart_triton.contract.validation import check_classes
from dart_triton.model.checkpoint import TEXT_MAX_LENGTH, load_sam3, load_tokenizer

DEFAULT_CACHE_SIZE = 4096  # entries
# Bytes of features, masks and names the cache may hold; whichever bound is hit first
# evicts. A SAM3 entry is 32 x 256 FP32 features + 32 INT32 mask ≈ 33 KB, so 4096 entries
# are ~134 MB: this cap binds only for wider text features (or a smaller setting).
DEFAULT_CACHE_BYTES = 256 * 2**20

# The warm cache on disk: tensors in safetensors (a format that cannot run code, unlike a
# pickled .npz) and, beside it, a JSON index with the names and the weights' fingerprint.
CACHE_FILE = "text_cache.safetensors"
CACHE_FORMAT = "dart-text-cache/1"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    size: int = 0
    bytes: int = 0


def cache_index_path(path: str | Path) -> Path:
    """The JSON index that goes with a cache's .safetensors file."""
    return Path(path).with_suffix(".json")


def _entry_bytes(name: str, feat: np.ndarray, mask: np.ndarray) -> int:
    return feat.nbytes + mask.nbytes + len(name.encode("utf-8", "surrogatepass"))


class TextEncoder:
    def __init__(self, text_model, projection, tokenizer, cache_size: int = DEFAULT_CACHE_SIZE,
                 device: str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.text_model = text_model.eval().to(device)
        self.projection = projection.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # Triton may call from several threads (BLS, decoupled)
        self.stats = CacheStats()

    @classmethod
    def from_sam3(cls, model, tokenizer, **kwargs) -> TextEncoder:
        return cls(model.text_encoder, model.text_projection, tokenizer, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> TextEncoder:
        return cls.from_sam3(load_sam3(path), load_tokenizer(path), **kwargs)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Text model, projection and tokenizer only: what a Triton text_encoder needs."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        self.text_model.save_pretrained(out / "text_model")
        self.tokenizer.save_pretrained(out / "tokenizer")
        save_file({k: v.contiguous() for k, v in self.projection.state_dict().items()},
                  str(out / "text_projection.safetensors"))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> TextEncoder:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        root = Path(path)
        text_model = CLIPTextModelWithProjection.from_pretrained(
            root / "text_model", attn_implementation="eager", dtype=torch.float32)
        weights = load_file(str(root / "text_projection.safetensors"))
        out_dim, in_dim = weights["weight"].shape
        projection = torch.nn.Linear(in_dim, out_dim)
        projection.load_state_dict(weights)
        return cls(text_model, projection, AutoTokenizer.from_pretrained(root / "tokenizer"),
                   **kwargs)

    @property
    def text_dim(self) -> int:
        return int(self.projection.out_features)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights a cache file was computed with."""
        w = self.projection.weight.detach().float().cpu().numpy()
        return hashlib.sha256(w.tobytes()).hexdigest()[:16]

    @torch.no_grad()
    def _compute(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer(names, padding="max_length", max_length=TEXT_MAX_LENGTH,
                             truncation=True, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        hidden = self.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        feats = self.projection(hidden)
        return feats.float().cpu().numpy(), mask.to(torch.int32).cpu().numpy()

    def encode(self, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (features FP32 [N, L, D], mask INT32 [N, L]); misses are encoded in one batch."""
        names = check_classes(classes, max_classes=None)
        with self._lock:
            missing = list(dict.fromkeys(n for n in names if n not in self._cache))
            self.stats.hits += len(names) - sum(1 for n in names if n in missing)
            self.stats.misses += sum(1 for n in names if n in missing)
            # Hold the picked entries locally: eviction below must not drop them mid-call.
            found = {n: self._cache[n] for n in names if n in self._cache}
            for n in found:
                self._cache.move_to_end(n)
        if missing:
            feats, masks = self._compute(missing)
            with self._lock:
                for n, f, m in zip(missing, feats, masks, strict=True):
                    found[n] = (f, m)
                    self._put(n, f, m)
        feats = np.stack([found[n][0] for n in names])
        masks = np.stack([found[n][1] for n in names])
        return feats, masks

    def _put(self, name: str, feat: np.ndarray, mask: np.ndarray) -> None:
        # Own copies: a row of a batch would keep the whole batch alive behind its byte count.
        feat, mask = np.array(feat, np.float32), np.array(mask, np.int32)
        if name in self._cache:
            self.stats.bytes -= _entry_bytes(name, *self._cache[name])
        self._cache[name] = (feat, mask)
        self._cache.move_to_end(name)
        self.stats.bytes += _entry_bytes(name, feat, mask)
        while self._cache and (len(self._cache) > self.cache_size
                               or self.stats.bytes > self.cache_bytes):
            old, entry = self._cache.popitem(last=False)
            self.stats.bytes -= _entry_bytes(old, *entry)
        self.stats.size = len(self._cache)

    def save_cache(self, path: str | Path, names: Sequence[str] | None = None) -> Path:
        """Write features for `names` (default: all cached) to `path` (.safetensors) and its
        JSON index (`cache_index_path`): no pickle, so loading one cannot run code."""
        from safetensors.numpy import save_file

        if names is not None:
            self.encode(list(names))
        with self._lock:
            keys = list(self._cache) if names is None else list(dict.fromkeys(names))
            feats = np.stack([self._cache[k][0] for k in keys])
            masks = np.stack([self._cache[k][1] for k in keys])
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: a text cache is written as a .safetensors file")
        save_file({"features": feats, "masks": masks}, str(path))
        index = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "names": keys}
        cache_index_path(path).write_text(json.dumps(index, ensure_ascii=False, indent=0),
                                          encoding="utf-8")
        return path

    def load_cache(self, path: str | Path) -> int:
        """Warm the cache from files written by `save_cache`; returns the names loaded.

        Raises ValueError, naming the file and the problem, for anything else: an old
        .npz cache (never opened: it could unpickle code), a missing or foreign index,
        other weights' features, or a corrupt or mis-shaped tensor file.
        """
        names, feats, masks = self._read_cache(Path(path))
        with self._lock:
            for n, f, m in zip(names, feats, masks, strict=True):
                self._put(n, f, m)
        return len(names)

    def _read_cache(self, path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors text cache (old .npz caches "
                             "are not read: loading one could run code)")
        index_path = cache_index_path(path)
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{index_path} is not a readable text-cache index: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
            raise ValueError(f"{index_path} is not a {CACHE_FORMAT} index")
        names = index.get("names")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{index_path}: 'names' must be a list of strings")
        if index.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path} was computed with different text-encoder weights")
        try:
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as exc:
            raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
        feats, masks = tensors.get("features"), tensors.get("masks")
        shape = (len(names), TEXT_MAX_LENGTH, self.text_dim)
        if (feats is None or masks is None or feats.shape != shape or feats.dtype != np.float32
                or masks.shape != shape[:2] or masks.dtype != np.int32):
            raise ValueError(f"{path} does not hold FP32 features {list(shape)} and INT32 "
                             f"masks {list(shape[:2])} for the {len(names)} names of its index")
        return names, feats, masks


def read_vocabulary(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
