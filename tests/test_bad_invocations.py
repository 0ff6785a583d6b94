"""Every user mistake: exit status 2, one line on stderr naming the problem, no traceback, no file.

Each case runs the real console script in a folder of its own, holding the inputs the mistakes
need; the folder's tree (names, sizes, modification times) must be the same afterwards. The
cases run in parallel (each is a subprocess, some import torch) and are checked one by one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cxrfusion.training.config import TrainConfig

TRAIN = ["train", "--prepared", "prepared"]
RUN_TEXT = "run_text/best.ckpt"
# Stand-ins for ports the `outcomes` fixture holds: one listened on by another program, one free.
BUSY_PORT, FREE_PORT = "<busy port>", "<free port>"
LISTEN = ["pacs", "listen", "--run", "run_empty"]
SEND_TO = ["--send-to", "ORTHANC@127.0.0.1:4242"]
# (id, arguments after `cxrfusion`, a word the error line must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("no-command", [], "COMMAND"),
    ("unknown-command", ["frobnicate"], "invalid choice"),
    ("synth-zero-images", ["synth", "--out", "ph", "--n", "0"], "--n"),
    ("synth-count-not-a-number", ["synth", "--out", "ph", "--n", "many"], "invalid int"),
    ("synth-images-too-small", ["synth", "--out", "ph", "--size", "8"], "--size"),
    ("synth-zero-workers", ["synth", "--out", "ph", "--workers", "0"], "--workers"),
    ("synth-negative-seed", ["synth", "--out", "ph", "--seed", "-1"], "--seed"),
    ("synth-without-out", ["synth", "--n", "5"], "--out"),
    ("synth-out-is-a-file", ["synth", "--out", "a_file", "--n", "5"], "a_file"),
    ("prepare-val-above-one", ["prepare", "--data", "d", "--out", "o", "--val", "1.5"], "--val"),
    ("prepare-zero-test", ["prepare", "--data", "d", "--out", "o", "--test", "0"], "--test"),
    (
        "prepare-no-training-share",
        ["prepare", "--data", "d", "--out", "o", "--val", "0.5", "--test", "0.5"],
        "val + test",
    ),
    (
        "prepare-zero-patient-fraction",
        ["prepare", "--data", "d", "--out", "o", "--patient-fraction", "0"],
        "--patient-fraction",
    ),
    ("prepare-tiny-cache", ["prepare", "--data", "d", "--out", "o", "--size", "8"], "--size"),
    (
        "prepare-zero-workers",
        ["prepare", "--data", "d", "--out", "o", "--workers", "0"],
        "--workers",
    ),
    (
        "prepare-unknown-split",
        ["prepare", "--data", "d", "--out", "o", "--split", "random"],
        "random",
    ),
    ("prepare-missing-data-folder", ["prepare", "--data", "nowhere", "--out", "o"], "nowhere"),
    ("prepare-folder-without-labels", ["prepare", "--data", "d", "--out", "o"], "label table"),
    ("prepare-label-csv-bad-header", ["prepare", "--data", "bad_csv", "--out", "o"], "Image Index"),
    ("models-unexpected-argument", ["models", "resnet"], "unrecognized"),
    ("train-unknown-loss", [*TRAIN, "--loss", "foo"], "--loss"),
    ("train-flip-not-a-probability", [*TRAIN, "--flip", "1.5"], "--flip"),
    ("train-zoom-of-one", [*TRAIN, "--zoom", "1"], "--zoom"),
    ("train-zero-batch", [*TRAIN, "--batch-size", "0"], "--batch-size"),
    ("train-batch-not-a-number", [*TRAIN, "--batch-size", "x"], "invalid int"),
    ("train-zero-epochs", [*TRAIN, "--epochs", "0"], "--epochs"),
    ("train-negative-phase1-epochs", [*TRAIN, "--phase1-epochs", "-1"], "--phase1-epochs"),
    ("train-input-above-cache", [*TRAIN, "--input-size", "512"], "--cache-size"),
    ("train-zero-lr", [*TRAIN, "--lr", "0"], "--lr"),
    ("train-focal-alpha-above-one", [*TRAIN, "--focal-alpha", "2"], "--focal-alpha"),
    ("train-plateau-factor-above-one", [*TRAIN, "--plateau-factor", "1.5"], "--plateau-factor"),
    ("train-negative-workers", [*TRAIN, "--workers", "-1"], "--workers"),
    ("train-unknown-precision", [*TRAIN, "--precision", "8"], "--precision"),
    ("train-unknown-accelerator", [*TRAIN, "--accelerator", "quantum"], "--accelerator"),
    ("train-devices-not-a-list", [*TRAIN, "--devices", "two"], "--devices"),
    ("train-fractional-batch-limit", [*TRAIN, "--limit-train-batches", "2.5"], "--limit-train"),
    ("train-bool-not-a-bool", [*TRAIN, "--channels-last", "maybe"], "true or false"),
    ("train-zero-devices", [*TRAIN, "--devices", "0"], "--devices"),
    ("train-unknown-model", [*TRAIN, "--model", "resnet9000"], "--model"),
    ("train-missing-weights-file", [*TRAIN, "--weights", "mine.pt"], "mine.pt"),
    ("train-unknown-strategy", [*TRAIN, "--strategy", "ddp_turbo"], "--strategy"),
    ("train-missing-config", [*TRAIN, "--config", "none.yaml"], "none.yaml"),
    ("train-config-word-for-number", [*TRAIN, "--config", "ten.yaml"], "epochs"),
    ("train-config-unknown-key", [*TRAIN, "--config", "typo.yaml"], "epoch"),
    ("train-config-not-a-mapping", [*TRAIN, "--config", "list.yaml"], "mapping"),
    ("train-config-broken-yaml", [*TRAIN, "--config", "broken.yaml"], "broken.yaml"),
    ("train-config-bad-augmentation", [*TRAIN, "--config", "augment.yaml"], "flip"),
    ("train-missing-prepared-folder", ["train", "--prepared", "nowhere"], "split.csv"),
    ("train-missing-data-folder", ["train", "--data", "nowhere"], "nowhere"),
    ("train-resume-without-run", [*TRAIN, "--resume", "--out", "fresh"], "no run to resume"),
    ("train-unknown-cache-place", [*TRAIN, "--cache-on-device", "gpu"], "--cache-on-device"),
    ("train-compile-not-a-bool", [*TRAIN, "--compile", "fast"], "true or false"),
    ("train-deterministic-not-a-bool", [*TRAIN, "--deterministic", "mostly"], "true or false"),
    ("train-config-compile-not-a-bool", [*TRAIN, "--config", "compile.yaml"], "compile"),
    ("train-config-unknown-cache-place", [*TRAIN, "--config", "cache.yaml"], "cache_on_device"),
    ("evaluate-without-run", ["evaluate"], "--run"),
    ("evaluate-missing-run", ["evaluate", "--run", "nowhere"], "nowhere"),
    ("evaluate-run-without-checkpoint", ["evaluate", "--run", "run_empty"], "best.ckpt"),
    ("evaluate-zero-mc-samples", ["evaluate", "--run", "run_empty", "--mc-samples", "0"], "--mc"),
    ("evaluate-unknown-split", ["evaluate", "--run", "run_empty", "--split", "all"], "all"),
    ("evaluate-text-checkpoint", ["evaluate", "--checkpoint", RUN_TEXT], "not a checkpoint"),
    ("evaluate-truncated-checkpoint", ["evaluate", "--run", "run_cut"], "not a checkpoint"),
    ("evaluate-zip-not-checkpoint", ["evaluate", "--run", "run_zip"], "checkpoint"),
    ("compare-one-run", ["compare", "run_a"], "two or more"),
    ("compare-missing-folder", ["compare", "run_a", "nowhere"], "nowhere"),
    ("compare-runs-not-evaluated", ["compare", "run_a", "run_b"], "predictions.csv"),
    ("compare-unknown-split", ["compare", "run_a", "run_b", "--split", "all"], "all"),
    ("external-without-prepared", ["external", "--run", "run_a"], "--prepared"),
    ("external-missing-run", ["external", "--run", "nowhere", "--prepared", "d"], "nowhere"),
    ("external-not-prepared", ["external", "--run", "run_a", "--prepared", "d"], "split.csv"),
    (
        "external-unknown-split",
        ["external", "--run", "run_a", "--prepared", "prepared", "--split", "dev"],
        "dev",
    ),
    (
        "external-zero-bootstrap",
        ["external", "--run", "run_a", "--prepared", "prepared", "--bootstrap", "0"],
        "bootstrap",
    ),
    ("download-no-workers", ["download", "nih", "--out", "d", "--workers", "0"], "--workers"),
    ("download-archive-13", ["download", "nih", "--out", "d", "--only", "13"], "--only"),
    ("download-from-nowhere", ["download", "nih", "--out", "d", "--from", "nowhere"], "nowhere"),
    ("export-missing-run", ["export", "--run", "nowhere"], "nowhere"),
    ("export-force-without-quantize", ["export", "--run", "run_empty", "--force"], "--force"),
    ("export-unknown-quantization", ["export", "--run", "run_empty", "--quantize", "int4"], "int4"),
    ("predict-missing-run", ["predict", "--run", "nowhere", "x.png"], "nowhere"),
    ("serve-port-zero", ["serve", "--run", "run_empty", "--port", "0"], "--port"),
    (
        "serve-missing-token-file",
        ["serve", "--run", "run_empty", "--token-file", "nowhere"],
        "--token-file nowhere",
    ),
    (
        "serve-empty-token-file",
        ["serve", "--run", "run_empty", "--token-file", "empty_token"],
        "empty",
    ),
    (
        "serve-token-and-token-file",
        ["serve", "--run", "run_empty", "--token", "t", "--token-file", "empty_token"],
        "not allowed with",
    ),
    (
        "serve-allowed-host-with-port",
        ["serve", "--run", "run_empty", "--allowed-hosts", "cxr.example.org:8000"],
        "--allowed-hosts",
    ),
    ("calibrate-missing-run", ["calibrate", "--run", "nowhere"], "nowhere"),
    ("pacs-listen-send-to-without-aet", [*LISTEN, "--send-to", "127.0.0.1:4242"], "AET@HOST:PORT"),
    ("pacs-listen-send-to-bad-port", [*LISTEN, "--send-to", "PACS@host:99999"], "--send-to"),
    ("pacs-listen-port-zero", [*LISTEN, *SEND_TO, "--port", "0"], "--port"),
    ("pacs-listen-long-ae-title", [*LISTEN, *SEND_TO, "--ae-title", "A" * 17], "--ae-title"),
    ("pacs-listen-port-in-use", [*LISTEN, *SEND_TO, "--port", BUSY_PORT], "in use"),
    ("pacs-listen-open-without-allow-ae", [*LISTEN, *SEND_TO, "--host", "0.0.0.0"], "--allow-ae"),
    (
        "pacs-listen-missing-run",
        ["pacs", "listen", "--run", "nowhere", *SEND_TO, "--port", FREE_PORT],
        "nowhere",
    ),
    ("reproduce-missing-data", ["reproduce", "--data", "nowhere", "--dry-run"], "nowhere"),
]


def _make_inputs(root: Path) -> None:
    """What the mistakes point at: empty folders, a bad label table, broken configs and runs."""
    for folder in ("d", "run_a", "run_b", "run_empty", "prepared"):
        (root / folder).mkdir()
    (root / "a_file").write_text("not a folder\n")
    (root / "empty_token").write_text("\n")
    (root / "prepared" / "split.csv").write_text("Image Index,split\n")
    (root / "bad_csv").mkdir()
    (root / "bad_csv" / "Data_Entry_2017.csv").write_text("Image,Labels\na.png,Mass\n")
    configs = {
        "ten.yaml": "epochs: ten\n",
        "typo.yaml": "epoch: 3\n",
        "list.yaml": "- epochs\n- 3\n",
        "broken.yaml": "epochs: [3\n",
        "augment.yaml": "augmentation: {flip: 2}\n",
        "compile.yaml": "compile: fast\n",
        "cache.yaml": "cache_on_device: sometimes\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    config = TrainConfig(prepared="prepared", out="run").to_yaml()
    checkpoint = root / "checkpoint.zip"
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00." * 100)
    contents = {
        "run_text": b"epoch 3, val auc 0.8\n",
        "run_cut": checkpoint.read_bytes()[:-40],
        "run_zip": checkpoint.read_bytes(),
    }
    checkpoint.unlink()
    for run, content in contents.items():
        (root / run).mkdir()
        (root / run / "best.ckpt").write_bytes(content)
    for run in ("run_empty", *contents):
        (root / run / "config.yaml").write_text(config)


def _tree(root: Path) -> set[tuple[str, int, int]]:
    return {
        (str(p.relative_to(root)), p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
    }


def _command() -> list[str]:
    """The installed console script next to this Python, else the module (same `main`)."""
    script = Path(sys.executable).with_name("cxrfusion")
    if script.exists():
        return [str(script)]
    found = shutil.which("cxrfusion")
    return [found] if found else [sys.executable, "-m", "cxrfusion.cli"]


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _run(root: Path, args: list[str]) -> tuple[subprocess.CompletedProcess, bool]:
    _make_inputs(root)
    before = _tree(root)
    result = subprocess.run(
        [*_command(), *args], cwd=root, capture_output=True, text=True, timeout=300, env=os.environ
    )
    return result, _tree(root) == before


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, request) -> dict:
    """Every selected case (all, unless `-k` picks some) run once, in parallel: the
    subprocesses mostly wait on imports."""
    selected = {
        item.callspec.params.get("case")
        for item in request.session.items
        if hasattr(item, "callspec")
    }
    cases = [(case, args, word) for case, args, word in CASES if case in selected]
    base = tmp_path_factory.mktemp("bad_invocations")
    roots = {case: base / case for case, _, _ in cases}
    for root in roots.values():
        root.mkdir()
    with _listening_socket() as free:
        free_port = free.getsockname()[1]  # released: free for the seconds the cases take
    with _listening_socket() as busy:
        ports = {BUSY_PORT: str(busy.getsockname()[1]), FREE_PORT: str(free_port)}
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {
                case: pool.submit(_run, roots[case], [ports.get(a, a) for a in args])
                for case, args, _ in cases
            }
            return {case: future.result() for case, future in futures.items()}


def test_the_table_covers_every_command_with_thirty_mistakes_or_more():
    commands = {args[0] for _, args, _ in CASES if args}
    assert commands >= {"synth", "prepare", "models", "train", "evaluate", "compare"}
    assert len(CASES) >= 30 and len({case for case, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "args", "word"), CASES, ids=[case for case, _, _ in CASES])
def test_a_mistake_exits_2_with_one_line_and_leaves_nothing(outcomes, case, args, word):
    result, unchanged = outcomes[case]
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr of `cxrfusion {' '.join(args)}`:\n{result.stderr}"
    assert lines[0].startswith("cxrfusion") and ": error: " in lines[0], lines[0]
    assert word.lower() in lines[0].lower(), lines[0]
    assert result.returncode == 2, lines[0]
    assert result.stdout == ""
    assert unchanged, f"`cxrfusion {' '.join(args)}` changed files in its folder"


def test_a_yaml_rate_written_without_a_dot_is_read_as_a_number(tmp_path):
    # YAML 1.1 reads `1e-3` as text; refusing it would punish the way people write rates.
    (tmp_path / "config.yaml").write_text("lr: 1e-3\nphase2_lr: 2E-5\n")
    config = TrainConfig.from_yaml(tmp_path / "config.yaml")
    assert (config.lr, config.phase2_lr) == (0.001, 2e-5)


def test_a_whole_batch_limit_from_the_command_line_becomes_a_count():
    # argparse gives 5.0 for `--limit-train-batches 5`; Lightning refuses a float above 1.
    assert TrainConfig(limit_train_batches=5.0).limit_train_batches == 5
    assert isinstance(TrainConfig(limit_train_batches=5.0).limit_train_batches, int)
