"""Several processes: two-phase DDP on CPU (gloo) through the README's commands, validation AUC
independent of the process count, and data prepared by rank 0 only."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
from torch.utils.data import DataLoader

import cxrfusion.data.prepare as prepare_module
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.split import read_split, write_split
from cxrfusion.data.synthetic import synthesize
from cxrfusion.errors import CxrError
from cxrfusion.inference.runs import load_run
from cxrfusion.training.launch import PREPARED_MARKER, ddp_strategy, launch_rank, prepare_once
from cxrfusion.training.module import MONITOR, CxrClassifier

BIN = Path(sys.executable).parent  # the console scripts of this environment: cxrfusion, torchrun
SIDE = "64"  # the side of the phantoms and cache made by conftest.py
TWO_CPU_PROCESSES = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
LAUNCH_VARIABLES = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def odd_val_prepared(prepared, tmp_path) -> Path:
    """The session's prepared phantoms with an odd validation split: 2 processes must pad it."""
    split = read_split(prepared / "split.csv")
    val = split.index[split["split"] == "val"]
    split = split.drop(val[: 1 - len(val) % 2])
    out = tmp_path / "prepared"
    write_split(split, out)
    for name in prepared.glob("images_*"):
        (out / name.name).symlink_to(name)
    return out


def test_two_processes_train_across_the_phase_switch_and_validate_as_one_does(
    odd_val_prepared, tmp_path
):
    """`cxrfusion train --devices 2 --strategy ddp` (Lightning launches the second process) on a
    backbone model; the AUC the 2 processes logged for the last epoch, over a padded validation
    split, equals the AUC of 1 process on last.ckpt."""
    out = tmp_path / "run"
    done = _run([
        str(BIN / "cxrfusion"), "train", "--prepared", str(odd_val_prepared), "--out", str(out),
        "--model", "test_efficientnet", "--weights", "none", "--epochs", "2", "--phase1-epochs", "1",
        "--phase2-lr", "3e-5", "--cache-size", SIDE, "--input-size", SIDE, "--batch-size", "16",
        "--limit-train-batches", "3", "--workers", "0", *TWO_CPU_PROCESSES,
    ])  # fmt: skip
    assert done.stdout.count("best validation macro AUC") == 1  # printed by rank 0 alone
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["phase"].tolist() == [1, 2]
    assert metrics["lr"].tolist()[1] == pytest.approx(3e-5)

    val = split_datasets(odd_val_prepared, 64, 64, split_file=out / "split.csv")["val"]
    assert len(val) % 2 == 1
    module = CxrClassifier.load_from_checkpoint(out / "last.ckpt", weights="none")
    one = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False)  # fmt: skip
    single = one.validate(module, DataLoader(val, batch_size=16), verbose=False)[0][MONITOR]
    assert single == pytest.approx(metrics[MONITOR].iloc[-1], abs=1e-6)


def test_torchrun_trains_fusion_across_the_phase_switch_preparing_the_data_once(tmp_path):
    """The README's torchrun recipe with `--data`: rank 0 prepares while rank 1 waits; fusion's
    two backbones are frozen, then trained, with gradients synchronised by DDP."""
    phantoms = synthesize(tmp_path / "phantoms", n=150, seed=1, size=64, workers=1)
    out = tmp_path / "fusion"
    _run([
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "cxrfusion.cli",
        "train", "--data", str(phantoms), "--prepared", str(tmp_path / "prepared"),
        "--out", str(out), "--model", "fusion", "--weights", "none", "--epochs", "2",
        "--phase1-epochs", "1", "--cache-size", SIDE, "--input-size", "32", "--batch-size", "8",
        "--limit-train-batches", "2", "--workers", "0", *TWO_CPU_PROCESSES,
    ])  # fmt: skip
    assert pd.read_csv(out / "metrics.csv")["phase"].tolist() == [1, 2]
    marker = json.loads((tmp_path / "prepared" / PREPARED_MARKER).read_text())
    assert marker == {"data": str(phantoms.resolve()), "size": 64}
    load_run(out)


@pytest.fixture
def rank(monkeypatch):
    """Set this process's launch rank as torchrun would."""
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return lambda value: monkeypatch.setenv("RANK", str(value))


def test_the_launch_rank_comes_from_torchrun_slurm_or_lightning(rank, monkeypatch):
    assert launch_rank() == 0  # a plain run, or Lightning's launching process
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning's launcher started
    assert launch_rank() == 1
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launch_rank() == 0
    rank(3)
    assert launch_rank() == 3


def test_only_rank_zero_prepares_and_the_others_wait_for_it(rank, monkeypatch, tmp_path):
    calls, preparing = [], threading.Event()

    def slow_prepare(data: Path, out: Path, options: PrepareOptions) -> None:
        calls.append(out)
        preparing.set()
        time.sleep(0.5)

    monkeypatch.setattr(prepare_module, "prepare", slow_prepare)
    data, out, options = tmp_path / "nih", tmp_path / "prepared", PrepareOptions(size=64)
    rank(1)
    with pytest.raises(CxrError, match=f"{out / PREPARED_MARKER}: rank 0 did not finish"):
        prepare_once(data, out, options, timeout_s=0.3, poll_s=0.05)

    rank(0)
    zero = threading.Thread(target=prepare_once, args=(data, out, options))
    zero.start()
    assert preparing.wait(10)  # rank 0 has read its rank and is preparing
    rank(1)
    started = time.monotonic()
    prepare_once(data, out, options, timeout_s=30, poll_s=0.05)
    waited = time.monotonic() - started
    zero.join()
    assert 0.3 < waited < 10 and calls == [out]  # rank 1 waited for rank 0 and never prepared

    with pytest.raises(CxrError, match="rank 0 did not finish"):  # another cache side: not ready
        prepare_once(data, out, PrepareOptions(size=128), timeout_s=0.2, poll_s=0.05)


def test_ddp_expects_unused_parameters_only_in_runs_that_freeze_a_backbone():
    assert ddp_strategy("ddp", "cpu", "2", 1, True) == "ddp_find_unused_parameters_true"
    assert ddp_strategy("ddp_spawn", "gpu", 4, 1, True) == "ddp_spawn_find_unused_parameters_true"
    assert ddp_strategy("auto", "cpu", "0,1", 1, True) == "ddp_find_unused_parameters_true"
    assert ddp_strategy("auto", "cpu", 1, 2, True) == "ddp_find_unused_parameters_true"
    assert ddp_strategy("auto", "cpu", "1", 1, True) == "auto"  # one process: no DDP at all
    assert ddp_strategy("ddp", "cpu", "2", 1, False) == "ddp"  # nothing frozen: DDP's fast path
