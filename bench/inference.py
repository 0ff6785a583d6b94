"""CPU inference with MC dropout: PyTorch eager vs ONNX Runtime on the export, side by side.

Per model (weights none: speed does not depend on the values), both engines run the same MC
dropout through the Engine protocol the Classifier calls: the backbone once, the head on T stacked
copies of the features (T=25), dropout masks drawn per row. Eager is `TorchEngine.sample_logits`
(evaluate's fast path, channels-last, inference mode); ONNX is `OnnxEngine.sample_logits` on the
graphs `cxrfusion export` writes (exported here, parity-checked). Latency: one image per
call; throughput: `--batch` images per call. Engines alternate for `--rounds` rounds (eager first,
then ONNX first, ...) and each keeps its best round, so neither gains from running second; a
round is the mean of at least `--repeats` calls and 0.5 s after one warm-up call. Target: ONNX >= 1.5x eager.

`--int8` adds a third engine in the same rounds: the export with `--quantize int8` (features graph
calibrated on built-in phantom radiographs, the check's AUC meaningless for random weights, so
forced). Target: INT8 >= 1.6x FP32 ONNX Runtime at batch 32; the features graph >= 2.5x smaller.

    nice python bench/inference.py --threads 2 [--models simple_cnn fusion] [--repeats 3] [--int8]
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
from cxrfusion.inference.quantize import phantom_images
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
    """Seconds per call of each engine at batch 1 and at `args.batch`, plus the backbones alone
    and, with --int8, the features graphs' sizes in bytes."""
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
    engines = {"eager": TorchEngine(model, "cpu"), "onnx": OnnxEngine(folder, threads=args.threads)}
    sizes = {}
    if args.int8:
        int8 = export_int8(model, folder.with_name(f"{name}-int8"), args.size)
        engines["int8"] = OnnxEngine(int8.folder, threads=args.threads)
        sizes = {
            f"{key}_bytes": value for key, value in int8.metadata["quantization"]["bytes"].items()
        }
    eager = engines["eager"]
    fns: dict[str, Callable[[], object]] = {}
    for batch in (1, args.batch):
        x = images(batch, args.size).numpy()
        for key, engine in engines.items():
            fns[f"{key}{batch}"] = lambda x=x, e=engine: e.sample_logits(x, args.samples, 0)
    x = images(args.batch, args.size).numpy()

    def eager_features() -> None:
        with torch.inference_mode():
            eager.model.features(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    fns["eager_features"] = eager_features
    fns["onnx_features"] = lambda: engines["onnx"].features(x)
    return {**best_alternating(fns, args.rounds, args.repeats), **sizes}


def export_int8(model: torch.nn.Module, folder: Path, size: int):
    """The INT8 export of `model`, calibrated and checked on 32 phantom radiographs."""
    start = time.perf_counter()
    data = phantom_images(32, size, size)
    sample = normalize(torch.from_numpy(data.images[:2, None]), model.mean, model.std)
    report = export_model(model, folder, {"labels": list(LABELS)}, sample, int8=data, force=True)
    check = report.metadata["quantization"]["check"]
    print(
        f"  {folder.name}: exported in {time.perf_counter() - start:.1f} s, largest probability "
        f"difference to FP32 {check['max_probability_difference']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list_models(), help="registered names")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="images per call for throughput")
    parser.add_argument("--samples", type=int, default=25, help="T, MC-dropout passes")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round (mean)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best kept")
    parser.add_argument("--threads", type=int, default=2, help="threads of both engines")
    parser.add_argument("--int8", action="store_true", help="add the INT8 export's columns")
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
    if args.int8:
        header += f"{'b1 int8 ms':>12}{f'b{b} int8 img/s':>16}{'int8/onnx':>10}{'MB fp32/int8':>15}"
    print(header, flush=True)
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            s = bench_model(name, args, Path(tmp) / name)
            row = (
                f"{name:<16}{1000 * s['eager1']:>12.1f}{1000 * s['onnx1']:>12.1f}"
                f"{s['eager1'] / s['onnx1']:>6.2f}x{b / s[f'eager{b}']:>17.1f}"
                f"{b / s[f'onnx{b}']:>16.1f}{s[f'eager{b}'] / s[f'onnx{b}']:>6.2f}x"
                f"{1000 * s['eager_features']:>13.0f} / {1000 * s['onnx_features']:.0f}"
            )
            if args.int8:
                ratios.append(f"{name} {s[f'onnx{b}'] / s[f'int8{b}']:.2f}x")
                row += (
                    f"{1000 * s['int81']:>12.1f}{b / s[f'int8{b}']:>16.1f}"
                    f"{s[f'onnx{b}'] / s[f'int8{b}']:>9.2f}x"
                    f"{s['fp32_bytes'] / 1e6:>9.1f} / {s['int8_bytes'] / 1e6:.1f}"
                )
            print(row, flush=True)
    print("ratio = eager time / ONNX Runtime time (> 1: ONNX Runtime faster); target >= 1.5x")
    if args.int8:
        print("int8/onnx = FP32 ONNX Runtime time / INT8 time; target >= 1.6x at batch 32")
        print(f"int8/fp32 onnx b{b} ratio: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
