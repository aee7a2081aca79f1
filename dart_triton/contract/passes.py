"""Passes over the class prompts, and the class-count buckets they are padded to.

A request's N prompts are decoded in passes of at most ``max_classes`` (`plan_passes`).

The plan for ``enc_dec`` is built with one optimisation profile per bucket over N
(the number of class prompts in one pass). Bucket ``b`` covers the range
``(previous bucket, b]`` and is tuned (``opt``) at exactly ``b``:

* any N up to the largest bucket is accepted, so a caller that forgets to pad still
  gets a correct answer (Triton's TensorRT backend picks the profile whose range holds N);
* a caller that pads N up to its bucket runs at the shape TensorRT tuned for and that
  Triton's CUDA graphs were captured at, so a handful of shapes serve every N.

Padded rows repeat the last real prompt rather than being zeros: an all-zero text mask
would make the text cross-attention softmax run over nothing (NaN on some kernels).
Rows are independent in the batched pass (paper §3.2), so the copies do not touch the
real rows, and the caller drops them with :func:`unpad`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ProfileRange:
    """min/opt/max of the dynamic class dimension N for one optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"profile range needs 1 <= min <= opt <= max, got {self}")

    def holds(self, n: int) -> bool:
        return self.min <= n <= self.max


def parse_buckets(spec: str | Iterable[int] | None) -> tuple[int, ...]:
    """``"1,4,16"`` (or an iterable of ints) -> sorted unique positive buckets ``(1, 4, 16)``.

    ``None`` or an empty string gives ``()`` (no bucketing: one profile).
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"buckets must be comma-separated integers like '1,4,16', got {spec!r}"
            ) from None
    else:
        values = [int(v) for v in spec]
    if any(v < 1 for v in values):
        raise ValueError(f"buckets must be >= 1, got {values}")
    return tuple(sorted(set(values)))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n`` classes."""
    if n < 1:
        raise ValueError(f"need at least one class, got n={n}")
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(
        f"{n} classes exceed the largest bucket {max(buckets)}: split the prompts into "
        "passes (see plan_passes)"
    )


class Pass(NamedTuple):
    """Prompts [start, stop) decoded together, padded to `rows` (>= stop - start)."""

    start: int
    stop: int
    rows: int


def plan_passes(n: int, max_classes: int, buckets: Sequence[int] = ()) -> list[Pass]:
    """Split ``n`` prompts into passes of at most ``max_classes`` (paper §3.4:
    ``ceil(n / max)`` passes for large vocabularies).

    Without buckets each pass holds exactly its prompts. With buckets (those up to
    ``max_classes``), full passes use the largest bucket and the remainder goes in the
    smallest bucket that holds it: each pass is padded to that bucket's rows.
    """
    if n < 1:
        raise ValueError(f"need at least one class, got n={n}")
    usable = [b for b in buckets if b <= max_classes]
    largest = max(usable) if usable else max_classes
    passes = []
    for start in range(0, n, largest):
        stop = min(start + largest, n)
        passes.append(Pass(start, stop, bucket_for(stop - start, usable) if usable
                           else stop - start))
    return passes


def check_pass_rows(rows: int, max_classes: int) -> None:
    """The guard of a graph model serving enc_dec: 1 to `max_classes` prompts per pass."""
    if not 1 <= rows <= max_classes:
        raise ValueError(f"enc_dec decodes 1 to {max_classes} prompts per pass, got {rows}")


def pad_to_bucket(text_features: T, text_mask: T, bucket: int) -> tuple[T, T]:
    """Pad ``[n, L, D]`` features and ``[n, L]`` mask to ``bucket`` rows.

    Works on numpy arrays and torch tensors alike (plain integer-list indexing). The
    extra rows repeat row ``n - 1``; drop them from every output with :func:`unpad`.
    """
    n = int(text_features.shape[0])
    if int(text_mask.shape[0]) != n:
        raise ValueError(f"text_features has {n} rows but text_mask {text_mask.shape[0]}")
    if n < 1:
        raise ValueError("cannot pad an empty prompt batch")
    if n > bucket:
        raise ValueError(f"{n} prompts do not fit in bucket {bucket}")
    if n == bucket:
        return text_features, text_mask
    rows = list(range(n)) + [n - 1] * (bucket - n)
    return text_features[rows], text_mask[rows]


def unpad(output: T, n: int) -> T:
    """Keep the first ``n`` (real) rows of an enc_dec output padded by :func:`pad_to_bucket`."""
    return output[:n]


def profile_ranges(
    max_classes: int, buckets: Sequence[int] = (), opt_classes: int | None = None
) -> list[ProfileRange]:
    """The enc_dec optimisation profiles over N.

    Without buckets: one profile ``1..max_classes`` tuned at ``opt_classes`` (default
    ``min(4, max_classes)``: the paper's real-time operating point at 1008 px, Table 2).
    With buckets: one profile per bucket, ``(previous, b]`` tuned at ``b``; the largest
    bucket must equal ``max_classes`` so the plan accepts exactly what the config declares.
    """
    if max_classes < 1:
        raise ValueError(f"max_classes must be >= 1, got {max_classes}")
    if not buckets:
        opt = min(4, max_classes) if opt_classes is None else opt_classes
        if not 1 <= opt <= max_classes:
            raise ValueError(f"opt_classes must be in 1..{max_classes}, got {opt}")
        return [ProfileRange(1, opt, max_classes)]
    buckets = parse_buckets(buckets)
    if buckets[-1] != max_classes:
        raise ValueError(
            f"the largest bucket ({buckets[-1]}) must equal max_classes ({max_classes})"
        )
    ranges, prev = [], 0
    for b in buckets:
        ranges.append(ProfileRange(prev + 1, b, b))
        prev = b
    return ranges


def batch_buckets(max_batch: int) -> list[int]:
    """The frame counts a batched backbone is prepared for (torch: warmed and CUDA-graphed
    at; TensorRT: a CUDA graph each): powers of two below max_batch, and max_batch (a
    batch runs at the next one, padded)."""
    return sorted({*(2 ** k for k in range(max_batch.bit_length()) if 2 ** k < max_batch),
                   max_batch})


def plan_shared_passes(rows: Sequence[int], max_rows: int) -> list[list[int]]:
    """Group requests (by their prompt counts `rows`, in arrival order) into shared passes
    of at most `max_rows` rows: each request whole, in one pass, and the passes in order,
    so an early request is never decoded after a later one. A request over `max_rows`
    is a caller's error (`dart` splits its prompts into passes of at most max_classes)."""
    passes: list[list[int]] = []
    filled = max_rows
    for i, n in enumerate(rows):
        if not 1 <= n <= max_rows:
            raise ValueError(f"a shared pass holds 1 to {max_rows} prompts per request, got {n}")
        if filled + n > max_rows:
            passes.append([])
            filled = 0
        passes[-1].append(i)
        filled += n
    return passes
