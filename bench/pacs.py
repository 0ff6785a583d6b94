"""PACS intake against a real Orthanc: instances per minute through `cxrfusion pacs poll --once`,
and store-to-result latency through `cxrfusion pacs listen`.

Both run the CLI as a user does (subprocesses) with the ONNX engine and MC dropout T = 25, on DX
radiographs built from real NIH images (`../shared/data/nih14-fullres`: frontal views, 1024 px,
8-bit as NIH ships them, each with its patient's ID, sex and view) in an Orthanc started here
(Debian's orthanc + orthanc-dicomweb, as the tests start it). Without `--run`, a fusion run at
224 px is trained for one batch on phantoms (random init: speed does not depend on the weights)
and exported.

Poll: `--poll-images` radiographs uploaded, then `pacs poll --once` timed from start to exit
(model load included), and the instances' own seconds from the audit log (fetch, predict, build,
STOW). Listen: one listener; Orthanc is told to C-STORE one radiograph at a time to it (REST
`/modalities/cxrfusion/store`, as a routing rule would), and the clock runs from that request
until Orthanc holds the radiograph's SR and capture; one untimed warm-up first.

    nice .venv/bin/python bench/pacs.py [--run RUN] [--poll-images 40] [--listen-images 20]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the tests' Orthanc and DICOM helpers, shared rather than copied
from dicoms import chest_dx, dicom_bytes  # noqa: E402
from orthanc import free_port, running_orthanc  # noqa: E402

FULLRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-fullres"
MODALITY = "cxrfusion"


def fusion_run(work: Path) -> Path:
    """A fusion run at 224 px trained for one batch on 64 phantoms, exported for ONNX Runtime."""
    from cxrfusion.data.options import PrepareOptions
    from cxrfusion.data.prepare import prepare
    from cxrfusion.data.synthetic import synthesize
    from cxrfusion.inference.export import export_run
    from cxrfusion.training.config import TrainConfig
    from cxrfusion.training.fit import train

    phantoms = synthesize(work / "phantoms", n=64, seed=0, size=256, workers=1)
    prepare(phantoms, work / "prepared", PrepareOptions(patient_fraction=1.0, size=224))
    config = TrainConfig(
        prepared=str(work / "prepared"),
        out=str(work / "fusion"),
        model="fusion",
        epochs=1,
        phase1_epochs=0,
        limit_train_batches=1,
        batch_size=4,
        cache_size=224,
        input_size=224,
        weights="none",
        workers=0,
    )
    run = Path(train(config))
    export_run(run)
    return run


def radiographs(count: int, offset: int = 0) -> list:
    """`count` DX datasets from the full-resolution NIH frontal views, starting at `offset`."""
    with (FULLRES / "Data_Entry_2017.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["View Position"] in ("PA", "AP")]
    rows.sort(key=lambda r: r["Image Index"])
    if offset + count > len(rows):
        raise SystemExit(f"{FULLRES} has {len(rows)} frontal images; asked for {offset + count}")
    datasets = []
    for row in rows[offset : offset + count]:
        pixels = np.asarray(Image.open(FULLRES / "images" / row["Image Index"]).convert("L"))
        ds = chest_dx(pixels, patient=row["Patient ID"], ViewPosition=row["View Position"])
        ds.PatientSex = row["Patient Gender"]
        datasets.append(ds)
    return datasets


def cxrfusion(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxrfusion.cli", *args]


def bench_poll(server, run: Path, args: argparse.Namespace, work: Path) -> dict:
    for ds in radiographs(args.poll_images):
        server.upload(dicom_bytes(ds))
    state = work / "poll.sqlite"
    command = cxrfusion("pacs", "poll", "--run", str(run), "--engine", "onnx", "--once")
    command += ["--dicomweb", server.dicomweb, "--user", "cxr", "--password", "test-secret"]
    command += ["--state", str(state), "--mc-samples", str(args.mc_samples)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in state.with_suffix(".audit.jsonl").open()]
    processed = [r for r in records if r["status"] == "processed"]
    if len(processed) != args.poll_images:
        raise SystemExit(f"poll processed {len(processed)} of {args.poll_images}: see {state}")
    steps = {
        key: np.mean([r["timings"][key] for r in processed])
        for key in ("predict_s", "build_s", "store_s", "total_s")
    }
    return {"wall_s": wall, "count": len(processed), **steps}


def bench_listen(server, run: Path, port: int, args: argparse.Namespace, work: Path) -> list:
    datasets = radiographs(args.listen_images + 1, offset=args.poll_images)
    ids = [server.upload(dicom_bytes(ds)) for ds in datasets]
    command = cxrfusion("pacs", "listen", "--run", str(run), "--engine", "onnx")
    command += ["--port", str(port), "--send-to", f"ORTHANC@127.0.0.1:{server.dicom_port}"]
    command += ["--state", str(work / "listen.sqlite"), "--mc-samples", str(args.mc_samples)]
    listener = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180  # imports and the model load
        while not _echoes(server):
            if listener.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the listener did not answer a C-ECHO within 3 minutes")
            time.sleep(0.2)
        latencies = []
        for i, orthanc_id in enumerate(ids):
            expected = _instances(server) + 2
            start = time.perf_counter()
            server.store_to(MODALITY, [orthanc_id])
            while _instances(server) < expected:
                if time.perf_counter() - start > 120:
                    raise SystemExit("no results within 2 minutes: see the listener's audit log")
                time.sleep(0.01)
            if i > 0:  # the first one warms the sessions up
                latencies.append(time.perf_counter() - start)
    finally:
        listener.send_signal(signal.SIGINT)
        code = listener.wait(timeout=120)
    if code != 0:
        raise SystemExit(f"the listener exited with status {code} after Ctrl-C")
    return latencies


def _echoes(server) -> bool:
    try:
        server.post(f"/modalities/{MODALITY}/echo", {})
        return True
    except requests.HTTPError:
        return False


def _instances(server) -> int:
    return server.get("/statistics").json()["CountInstances"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="run with an ONNX export (default: train one)")
    parser.add_argument("--poll-images", type=int, default=40, help="instances polled (40)")
    parser.add_argument("--listen-images", type=int, default=20, help="instances timed (20)")
    parser.add_argument("--mc-samples", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        run = args.run or fusion_run(work)
        made = time.perf_counter() - start
        port = free_port()
        with running_orthanc(
            work / "orthanc", {MODALITY: ["CXRFUSION", "127.0.0.1", port]}
        ) as server:
            poll = bench_poll(server, run, args, work)
            latencies = bench_listen(server, run, port, args, work)
    load = os.getloadavg()
    what = args.run or f"fusion 224 px, trained here for one batch ({made:.0f} s, with export)"
    print(
        f"run {what}; engine onnx, T={args.mc_samples}; {os.cpu_count()} CPU cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the end"
    )
    print(
        f"poll --once: {poll['count']} instances in {poll['wall_s']:.1f} s wall (start and model "
        f"load included): {60 * poll['count'] / poll['wall_s']:.1f} instances/min; per instance "
        f"{poll['total_s']:.2f} s ({60 / poll['total_s']:.1f}/min): predict "
        f"{poll['predict_s']:.2f} s, build SR + capture {poll['build_s']:.2f} s, STOW "
        f"{poll['store_s']:.2f} s, the rest fetching and recording"
    )
    ms = 1000 * np.percentile(latencies, [50, 95])
    print(
        f"listen: store-to-result latency over {len(latencies)} radiographs sent one at a time: "
        f"p50 {ms[0]:.0f} ms, p95 {ms[1]:.0f} ms (min {1000 * min(latencies):.0f}, max "
        f"{1000 * max(latencies):.0f})"
    )


if __name__ == "__main__":
    main()
