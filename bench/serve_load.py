"""Load on a real `cxrfusion serve` on 127.0.0.1: N requests at concurrency C, side by side.

For each setup in turn (by default the service without batching, `--max-batch 1`, and with
dynamic batching, `--max-batch 8`; with `--int8`, also the INT8 ONNX export of the run, batched),
starts the server as the CLI does (a subprocess), waits for /health, sends one untimed warm-up
request, then `--requests` POST /predict with real images, at most `--concurrency` in flight
(httpx, async). Prints one line per setup: requests/s, p50/p95/p99 latency and the errors by
status; the target is zero errors with `--queue` >= `--concurrency`. Without `--run`, it trains
a tiny model on 300 phantoms first (timm's test_efficientnet at 64 px, 2 epochs, under a minute
on 2 CPU cores).

    .venv/bin/python bench/serve_load.py --run runs/fusion --requests 200 --concurrency 16 --int8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

NIH_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-sample" / "images"


def tiny_run(work: Path) -> Path:
    """Train timm's test_efficientnet for 2 epochs on 300 phantoms at 64 px."""
    from cxrfusion.data.options import PrepareOptions
    from cxrfusion.data.prepare import prepare
    from cxrfusion.data.synthetic import synthesize
    from cxrfusion.training.config import TrainConfig
    from cxrfusion.training.fit import train

    phantoms = synthesize(work / "phantoms", n=300, seed=0, size=64)
    prepare(phantoms, work / "prepared", PrepareOptions(patient_fraction=1.0, size=64))
    config = TrainConfig(
        prepared=str(work / "prepared"),
        out=str(work / "run"),
        model="test_efficientnet",
        epochs=2,
        phase1_epochs=0,
        cache_size=64,
        input_size=64,
        weights="none",
        workers=0,
    )
    return train(config)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Setup:
    """One server configuration to load: what it serves, on which engine, batching how much."""

    name: str
    model: Path  # a run directory, or an ONNX export folder for engine "onnx"
    engine: str
    max_batch: int


def start_server(setup: Setup, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "cxrfusion.cli", "serve", "--run", str(setup.model)]
    command += ["--port", str(port), "--queue", str(args.queue), "--engine", setup.engine]
    command += ["--mc-samples", str(args.mc_samples), "--max-batch", str(setup.max_batch)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):  # at most 2 minutes to import torch and load the run
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.terminate()
    raise SystemExit("the server did not answer /health within 2 minutes")


async def load(url: str, images: list[tuple[str, bytes]], args: argparse.Namespace) -> tuple:
    """(latencies of the successful requests, Counter of failures, wall seconds)."""
    latencies: list[float] = []
    failures: Counter = Counter()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def post(i: int) -> httpx.Response:
            name, data = images[i % len(images)]
            params = {"heatmap": "true"} if args.heatmap else {}
            return await client.post("/predict", params=params, files={"file": (name, data)})

        await post(0)  # warm-up, untimed

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                start = time.perf_counter()
                try:
                    response = await post(i)
                except httpx.HTTPError as error:
                    failures[type(error).__name__] += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures[f"HTTP {response.status_code}"] += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    return latencies, failures, wall


def setups(run: Path, work: Path, args: argparse.Namespace) -> list[Setup]:
    """The configurations to compare, INT8 last (exported here, from the run, when asked)."""
    found = [
        Setup(f"{args.engine} fp32, max-batch {b}", run, args.engine, b) for b in args.max_batch
    ]
    if args.int8:
        from cxrfusion.inference.export import export_run

        # --force: the tiny default run may miss the AUC check; the bench measures speed
        export = export_run(run, work / "int8", quantize="int8", force=True)
        top = max(args.max_batch)
        found.append(Setup(f"onnx int8, max-batch {top}", export.folder, "onnx", top))
    return found


def measure(setup: Setup, images: list[tuple[str, bytes]], args: argparse.Namespace) -> str:
    """Load one server and summarise it in one line."""
    port = free_port()
    server = start_server(setup, port, args)
    try:
        latencies, failures, wall = asyncio.run(load(f"http://127.0.0.1:{port}", images, args))
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = 1000 * np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    errors = sum(failures.values())
    return (
        f"{setup.name:<28} {len(latencies) / wall:6.1f} req/s   p50 {ms[0]:5.0f} ms   "
        f"p95 {ms[1]:5.0f} ms   p99 {ms[2]:5.0f} ms   errors {errors}"
        + (f" ({dict(failures)})" if failures else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run directory (default: train a tiny one)")
    parser.add_argument("--images", type=Path, default=NIH_SAMPLE, help="folder of PNGs to send")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--queue", type=int, default=16, help="server --queue (default 16)")
    parser.add_argument("--mc-samples", type=int, default=25)
    parser.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    parser.add_argument(
        "--max-batch", type=int, nargs="+", default=[1, 8], help="setups to compare (default 1 8)"
    )
    parser.add_argument("--int8", action="store_true", help="add the run's INT8 export, batched")
    parser.add_argument("--heatmap", action="store_true", help="ask for Grad-CAM overlays too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        run = args.run or tiny_run(work)
        files = sorted(args.images.glob("*.png"))[:50] if args.images.is_dir() else []
        if not files:
            files = sorted((work / "phantoms" / "images").glob("*.png"))[:50]
        if not files:
            raise SystemExit(f"no PNG images in {args.images}; pass --images")
        images = [(f.name, f.read_bytes()) for f in files]
        print(
            f"run {args.run or 'tiny test_efficientnet trained here (64 px, 2 epochs)'}, "
            f"T={args.mc_samples}, heatmap {args.heatmap}, {len(images)} distinct images from "
            f"{files[0].parent}; {args.requests} requests at concurrency {args.concurrency} "
            f"(server queue {args.queue}), {os.cpu_count()} CPUs"
        )
        for setup in setups(run, work, args):
            print(measure(setup, images, args), flush=True)


if __name__ == "__main__":
    main()
