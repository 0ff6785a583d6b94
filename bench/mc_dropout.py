"""MC-dropout cost per model: one deterministic pass vs T full stochastic passes vs the fast path.

The fast path (`mc_dropout_samples(mode="head")`) runs the backbone once and the head T times in
one batched call; the target is <= 1.1x a deterministic pass. The last two columns time the T
head passes alone, batched (T*B rows at once, what the fast path does) and looped.

    .venv/bin/python bench/mc_dropout.py --batch 8 --samples 25 --size 224 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

from cxrfusion.models import create_model, list_models
from cxrfusion.models.mc_dropout import mc_dropout_samples


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function; each round calls every function once, so a load change on a
    shared machine hits them alike. One untimed warm-up call each, except `naive`, whose shapes
    the deterministic warm-up already ran."""
    for name, fn in fns.items():
        if name != "naive":
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Seconds for the deterministic pass, naive and fast MC dropout, and T head passes."""
    model = create_model(name, weights="none").eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    t = args.samples
    with torch.inference_mode():
        features = model.features(x)

    def deterministic() -> None:
        with torch.inference_mode():
            model(x)

    def heads_looped() -> None:
        with torch.inference_mode():
            for _ in range(t):
                model.head(features)

    def heads_batched() -> None:
        with torch.inference_mode():
            model.head(features.repeat(t, 1))

    return interleaved_medians(
        {
            "deterministic": deterministic,
            "naive": lambda: mc_dropout_samples(model, x, t, mode="full"),
            "fast": lambda: mc_dropout_samples(model, x, t, mode="head"),
            "heads_batched": heads_batched,
            "heads_looped": heads_looped,
        },
        args.repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per pass")
    parser.add_argument("--samples", type=int, default=25, help="T, stochastic passes")
    parser.add_argument("--models", nargs="+", default=list_models(), help="registered names")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    print(
        f"CPU, {args.threads} threads, batch {args.batch}, {args.size} px, T={args.samples}, "
        f"median of {args.repeats} interleaved rounds; times in ms"
    )
    header = (
        f"{'model':<16}{'determ.':>9}{'naive':>10}{'fast':>9}{'fast/det':>9}{'naive/fast':>11}"
        f"{'heads bat.':>11}{'heads loop':>11}"
    )
    print(header)
    for name in args.models:
        s = bench_model(name, args)
        ms = {key: 1000 * value for key, value in s.items()}
        verdict = "ok" if s["fast"] <= 1.1 * s["deterministic"] else "over 1.1x"
        print(
            f"{name:<16}{ms['deterministic']:>9.1f}{ms['naive']:>10.1f}{ms['fast']:>9.1f}"
            f"{s['fast'] / s['deterministic']:>8.2f}x{s['naive'] / s['fast']:>10.1f}x"
            f"{ms['heads_batched']:>11.2f}{ms['heads_looped']:>11.2f}  {verdict}",
            flush=True,
        )


if __name__ == "__main__":
    main()
