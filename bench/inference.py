"""CPU inference with MC dropout: PyTorch eager vs ONNX Runtime on the export, side by side.

Per model (weights none: speed does not depend on the values), both engines run the same MC
dropout through the Engine protocol the Classifier calls: the backbone once, the head on T stacked
copies of the features (T=25), dropout masks drawn per row. Eager is `TorchEngine.sample_logits`
(evaluate's fast path, channels-last, inference mode); ONNX is `OnnxEngine.sample_logits` on the
graphs `cxrfusion export` writes (exported here, parity-checked). Latency: one image per
call; throughput: `--batch` images per call. Engines alternate for `--rounds` rounds (eager first,
then ONNX first, ...) and each keeps its best round, so neither gains from running second; a
round is the mean of at least `--repeats` calls and 0.5 s after one warm-up call. Target: ONNX >= 1.5x eager.

    nice python bench/inference.py --threads 2 [--models simple_cnn fusion] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cxrfusion.data.transforms import normalize
from cxrfusion.inference.export import export_model
from cxrfusion.inference.onnx_engine import OnnxEngine
from cxrfusion.inference.torch_engine import TorchEngine
from cxrfusion.labels import LABELS
from cxrfusion.models import create_model, list_models


def seconds_per_call(fn: Callable[[], object], repeats: int, min_seconds: float = 0.5) -> float:
    """Mean seconds per call over at least `repeats` calls and `min_seconds`, after a warm-up
    call: a 3 ms call timed 3 times is mostly noise (simple_cnn at batch 1 read 1.24x that way,
    1.60x over 30 calls)."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < repeats or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


def best_alternating(fns: dict[str, Callable[[], object]], rounds: int, repeats: int):
    """Best seconds per call of each function over `rounds` rounds with alternating order."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times[name].append(seconds_per_call(fns[name], repeats))
    return {name: min(values) for name, values in times.items()}


def images(batch: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    shape = (batch, 1, size, size)
    return normalize(torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator))


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Seconds per call of both engines at batch 1 and at `args.batch`, plus the backbone alone."""
    torch.manual_seed(0)
    model = create_model(name, weights="none").eval()
    start = time.perf_counter()
    report = export_model(model, folder, {"labels": list(LABELS)}, images(2, args.size))
    print(
        f"  {name}: exported in {time.perf_counter() - start:.1f} s, max abs difference "
        f"{max(report.max_abs_diff.values()):.1e}",
        file=sys.stderr,
        flush=True,
    )
    eager, onnx = TorchEngine(model, "cpu"), OnnxEngine(folder, threads=args.threads)
    fns: dict[str, Callable[[], object]] = {}
    for batch in (1, args.batch):
        x = images(batch, args.size).numpy()
        fns[f"eager{batch}"] = lambda x=x: eager.sample_logits(x, args.samples, 0)
        fns[f"onnx{batch}"] = lambda x=x: onnx.sample_logits(x, args.samples, 0)
    x = images(args.batch, args.size).numpy()

    def eager_features() -> None:
        with torch.inference_mode():
            eager.model.features(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    fns["eager_features"] = eager_features
    fns["onnx_features"] = lambda: onnx.features(x)
    return best_alternating(fns, args.rounds, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models(), help="registered names")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per call for throughput")
    parser.add_argument("--samples", type=int, default=25, help="T, MC-dropout passes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round (mean)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument("--threads", type=int, default=2, help="threads of both engines")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    print(
        f"CPU, {args.threads} threads, {args.size} px, MC dropout T={args.samples}, weights none; "
        f"best of {args.rounds} alternating rounds of >= {args.repeats} calls and 0.5 s"
    )
    b = args.batch
    header = (
        f"{'model':<16}{'b1 eager ms':>12}{'b1 onnx ms':>12}{'ratio':>7}"
        f"{f'b{b} eager img/s':>17}{f'b{b} onnx img/s':>16}{'ratio':>7}"
        f"{f'backbone b{b} e/o ms':>22}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            s = bench_model(name, args, Path(tmp) / name)
            print(
                f"{name:<16}{1000 * s['eager1']:>12.1f}{1000 * s['onnx1']:>12.1f}"
                f"{s['eager1'] / s['onnx1']:>6.2f}x{b / s[f'eager{b}']:>17.1f}"
                f"{b / s[f'onnx{b}']:>16.1f}{s[f'eager{b}'] / s[f'onnx{b}']:>6.2f}x"
                f"{1000 * s['eager_features']:>13.0f} / {1000 * s['onnx_features']:.0f}",
                flush=True,
            )
    print("ratio = eager time / ONNX Runtime time (> 1: ONNX Runtime faster); target >= 1.5x")


if __name__ == "__main__":
    main()
