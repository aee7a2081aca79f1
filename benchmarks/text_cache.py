"""Text cache: cold vs warm encode latency for the 80 COCO class names (DART §3.4).

Cold = every name misses the LRU cache (SAM3's CLIP text encoder runs on the batch);
warm = every name hits (dictionary lookups and one stack). Target: warm < 1 ms.

    python -m dart_triton.benchmarks.text_cache
"""

from __future__ import annotations

from pathlib import Path

from dart_triton.benchmarks import common

STUDY = "text_cache"
COLUMNS = ["case", "n", "ms", "us_per_name", "hits", "misses"]
TARGET_WARM_MS = 1.0


def measure(encoder, names: list[str], iters: int, warmup: int) -> list[dict]:
    rows = []

    def cold() -> None:
        encoder._cache.clear()
        encoder.encode(names)

    for case, fn, reps in (("cold (all miss)", cold, iters),
                           ("warm (all hit)", lambda: encoder.encode(names), max(100, iters)),
                           ("cold, 1 name", lambda: (encoder._cache.clear(),
                                                     encoder.encode(names[:1])), iters),
                           ("warm, 1 name", lambda: encoder.encode(names[:1]), max(100, iters))):
        before = (encoder.stats.hits, encoder.stats.misses)
        timing = common.time_call(fn, reps, warmup)
        n = 1 if "1 name" in case else len(names)
        rows.append({"case": case, "n": n, "ms": timing.median_ms,
                     "us_per_name": timing.median_ms * 1e3 / n,
                     "hits": encoder.stats.hits - before[0],
                     "misses": encoder.stats.misses - before[1]})
        print(f"  {rows[-1]}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    fig, (ax,) = common.new_figure(width=6)
    bars = ax.bar([r["case"] for r in rows], [r["ms"] for r in rows],
                  color=["C3" if "cold" in r["case"] else "C2" for r in rows])
    ax.bar_label(bars, fmt="%.3g ms", fontsize=8)
    ax.axhline(TARGET_WARM_MS, color="k", ls="--", lw=0.8, label="1 ms target (warm)")
    ax.set_yscale("log")
    ax.set_ylabel("encode latency (ms, median)")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = common.base_parser(f"python -m dart_triton.benchmarks.{STUDY}", __doc__.splitlines()[0],
                           classes=(80,), iters=5)
    args = p.parse_args(argv)
    from dart_triton.model.checkpoint import load_sam3, load_tokenizer
    from dart_triton.model.text_encoder import TextEncoder

    checkpoint = common.checkpoint_for(args)
    model = load_sam3(checkpoint)
    encoder = TextEncoder.from_sam3(model, load_tokenizer(checkpoint))
    names = common.class_names(args.classes[0])
    rows = measure(encoder, names, args.iters, args.warmup)
    warm = next(r for r in rows if r["case"].startswith("warm ("))
    verdict = (f"Warm encode of {warm['n']} names: {warm['ms']:.3f} ms — target < "
               f"{TARGET_WARM_MS:g} ms {'met' if warm['ms'] < TARGET_WARM_MS else 'MISSED'}.")
    cold = rows[0]
    verdict += f" Cold/warm: {cold['ms'] / warm['ms']:.0f}x."
    command = common.command_line(f"dart_triton.benchmarks.{STUDY}", argv)
    notes = (f"`TextEncoder.encode` in process, CPU, {args.classes[0]} COCO names "
             f"(dart_triton/assets/coco80.txt); cold runs clear the cache first. {verdict}")
    head = common.section_header("Text-embedding cache", command,
                                 f"{args.config}: {common.model_summary(model)}", notes)
    common.write_csv(rows, args.out / f"{STUDY}.csv")
    plot(rows, args.out / f"{STUDY}.png")
    table = common.markdown_table(rows, COLUMNS, digits=3)
    common.update_section(args.results, STUDY,
                          f"{head}\n{table}\n\n{common.image_link(args, STUDY, 'text cache')}\n")
    print(verdict)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
