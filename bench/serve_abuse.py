"""Normal requests to a real `cxrfusion serve` while attackers send the review's crafted uploads.

Starts the server as the CLI does (`serve_load.start_server`), measures `--requests` normal
POST /predict at `--concurrency` alone, then again while `--attackers` clients each send, back to
back, a progressive JPEG claiming `--side` x `--side` pixels with `--scans` empty scans (the
review's: 60 MP, 3,000 scans, which held the model thread for minutes). Prints the normal
requests' latency percentiles and errors, the attackers' answers, and the server's memory growth
under a 17 MB form of 355k one-byte fields. The acceptance target: every normal request answered,
p95 under 2 s on 2 cores. `--scans 100` sends the worst JPEG that passes the scan limit, so the
decoders' time limit (`--decode-timeout`) is what bounds it.

    .venv/bin/python bench/serve_abuse.py --requests 50 --attackers 4
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from serve_load import NIH_SAMPLE, free_port, load, start_server, tiny_run


def crafted_jpeg(side: int, scans: int) -> bytes:
    """A black progressive JPEG, its last (empty) scan repeated up to `scans` scans."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def many_fields(count: int) -> Iterator[bytes]:
    """A multipart body of `count` one-byte fields, streamed in chunks."""
    for start in range(0, count, 1000):
        fields = range(start, min(start + 1000, count))
        part = '--b\r\nContent-Disposition: form-data; name="f{}"\r\n\r\nx\r\n'
        yield "".join(part.format(i) for i in fields).encode()
    yield b"--b--\r\n"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def under_attack(url: str, images: list, bomb: bytes, args: argparse.Namespace) -> tuple:
    """`load`'s figures while the attackers send `bomb`; and the attackers' answers."""
    answers: Counter = Counter()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def attack() -> None:
            while not stop.is_set():
                response = await client.post("/predict", files={"file": ("bomb.jpg", bomb)})
                answers[response.status_code] += 1

        attackers = [asyncio.create_task(attack()) for _ in range(args.attackers)]
        await asyncio.sleep(1)  # every attacker has a request in flight
        figures = await load(url, images, args)
        stop.set()
        await asyncio.gather(*attackers)
    return figures, answers


def form_growth_mb(url: str, pid: int) -> tuple[int, float]:
    """Status of a 355k-field form, and the server's RSS growth while it was sent."""
    before, peak, done = rss_mb(pid), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = httpx.post(
            f"{url}/predict",
            content=many_fields(355_000),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            timeout=600,
        )
    finally:
        done.set()
        sampler.join()
    return response.status_code, peak[0] - before


def summary(label: str, figures: tuple, args: argparse.Namespace) -> str:
    latencies, failures, wall = figures
    ms = 1000 * np.percentile(latencies, [50, 95, 100]) if latencies else [float("nan")] * 3
    return (
        f"{label}: {len(latencies)}/{args.requests} answered 200, p50 {ms[0]:.0f} ms, "
        f"p95 {ms[1]:.0f} ms, max {ms[2]:.0f} ms, errors {dict(failures) or 0}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run directory (default: train a tiny one)")
    parser.add_argument("--images", type=Path, default=NIH_SAMPLE, help="folder of PNGs to send")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--side", type=int, default=7745, help="crafted JPEG side (60 MP)")
    parser.add_argument("--scans", type=int, default=3000, help="crafted JPEG scans")
    parser.add_argument("--decode-timeout", type=float, default=20, help="server's (default 20)")
    parser.add_argument("--queue", type=int, default=16, help="server --queue (default 16)")
    parser.add_argument("--mc-samples", type=int, default=25)
    parser.add_argument("--engine", choices=("torch", "onnx"), default="torch")
    args = parser.parse_args()
    args.heatmap = False
    bomb = crafted_jpeg(args.side, args.scans)
    with tempfile.TemporaryDirectory() as work:
        run = args.run or tiny_run(Path(work))
        files = sorted(args.images.glob("*.png"))[:50] if args.images.is_dir() else []
        files = files or sorted((Path(work) / "phantoms" / "images").glob("*.png"))[:50]
        images = [(f.name, f.read_bytes()) for f in files]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        extra = ("--decode-timeout", str(args.decode_timeout))
        server = start_server(run, port, args, extra)
        try:
            alone = asyncio.run(load(url, images, args))
            attacked, answers = asyncio.run(under_attack(url, images, bomb, args))
            form_status, growth = form_growth_mb(url, server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"run {args.run or 'tiny test_efficientnet (64 px)'}, engine {args.engine}, "
        f"T={args.mc_samples}, {len(images)} images from {files[0].parent}; {args.requests} "
        f"requests at concurrency {args.concurrency}, server queue {args.queue}, decode "
        f"time limit {args.decode_timeout:g} s"
    )
    print(summary("alone", alone, args))
    print(
        summary(
            f"with {args.attackers} attackers sending {len(bomb) // 1024} KB JPEGs "
            f"({args.side}x{args.side}, {args.scans} scans)",
            attacked,
            args,
        )
    )
    print(f"attackers' answers: {dict(answers)}")
    print(f"355k-field form: HTTP {form_status}, server RSS growth {growth:.0f} MB")


if __name__ == "__main__":
    main()
