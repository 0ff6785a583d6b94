"""`cxrfusion reproduce`: the plan is real commands with the report's settings; a run on phantoms
does every step, a second run skips them all; no GPU means a one-line refusal."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
import torch

from cxrfusion import reproduce
from cxrfusion.cli import build_parser, main
from cxrfusion.cli.training import train_config
from cxrfusion.data.options import PrepareOptions
from cxrfusion.errors import CxrError
from cxrfusion.training.config import TrainConfig

NIH_META = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-meta"
TINY = [
    "--allow-cpu",
    "--models", "simple_cnn", "test_efficientnet",
    "--patient-fraction", "0.25",
    "--cache-size", "32",
    "--input-size", "32",
    "--epochs", "1",
    "--weights", "none",
    "--mc-samples", "2",
    "--bootstrap", "10",
    "--workers", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def nih_meta() -> Path:
    if not NIH_META.exists():
        pytest.skip(f"NIH label table not found at {NIH_META} (../shared is absent)")
    return NIH_META


def _commands(stdout: str) -> list[list[str]]:
    """The plan's command lines (comments start with #), split as a shell would."""
    lines = [line for line in stdout.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_dry_run_prints_the_reports_protocol_as_commands_cxrfusion_parses(
    nih_meta: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "reproduce"
    assert main(["reproduce", "--dry-run", "--data", str(nih_meta), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "fusion: up to " in stdout  # the H100 throughput measured by bench/train_step.py
    commands = _commands(stdout)
    assert [c[:2] for c in commands] == [
        ["cxrfusion", "prepare"],
        *[["cxrfusion", "train"]] * 4,
        *[["cxrfusion", "evaluate"]] * 4,
        ["cxrfusion", "compare"],
    ]
    parsed = [build_parser().parse_args(c[1:]) for c in commands]
    steps = reproduce.plan(nih_meta, out)
    prepare = parsed[0]
    for field in dataclasses.fields(PrepareOptions):
        assert getattr(prepare, field.name) == getattr(steps[0].settings, field.name)
    assert (prepare.split, prepare.patient_fraction, prepare.val, prepare.test, prepare.size) == (
        "iterative", 0.5, 0.1, 0.2, 256
    )  # fmt: skip
    table1 = TrainConfig()
    for args, step in zip(parsed[1:5], steps[1:5], strict=True):
        config = train_config(args)
        assert config == step.settings, "the command trains exactly what reproduce trains"
        same = {f.name for f in dataclasses.fields(TrainConfig)} - {"prepared", "out", "model"}
        assert {k: getattr(config, k) for k in same - {"devices"}} == {
            k: getattr(table1, k) for k in same - {"devices"}
        }, "Table 1 (TrainConfig's defaults), 224 px, ImageNet weights"
    assert [train_config(a).model for a in parsed[1:5]] == list(reproduce.REPORT_MODELS)
    for args in parsed[5:9]:
        assert (args.split, args.mc_samples, args.bootstrap) == ("test", 25, 1000)
    assert [Path(r).name for r in parsed[9].runs] == list(reproduce.REPORT_MODELS)
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run_estimates_wall_time_from_measured_throughput(
    nih_meta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(reproduce, "GPU_THROUGHPUT", {"Test GPU": {"fusion": 100.0}})
    assert main(["reproduce", "--dry-run", "--data", str(nih_meta), "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    train_images = round(112_120 * 0.5 * 0.7)  # before prepare: estimated from the table
    minutes = 25 * train_images / 100.0 / 60
    assert f"fusion: up to {minutes:,.0f} min on Test GPU (25 epochs x {train_images:,}" in stdout
    assert "densenet121: no GPU throughput measured yet on Test GPU" in stdout


def test_reproduce_runs_every_step_on_phantoms_then_a_second_call_skips_them_all(
    phantoms: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "reproduce"
    argv = ["reproduce", "--data", str(phantoms), "--out", str(out), *TINY]
    assert main(argv) == 0
    first = [line for line in capsys.readouterr().out.splitlines() if ": cxrfusion " in line]
    assert [line.split(" ")[:3] for line in first] == [
        ["run:", "cxrfusion", "prepare"],
        *[["run:", "cxrfusion", "train"]] * 2,
        *[["run:", "cxrfusion", "evaluate"]] * 2,
        ["run:", "cxrfusion", "compare"],
    ]
    for model in ("simple_cnn", "test_efficientnet"):
        assert (out / model / "best.ckpt").exists()
        assert (out / model / "eval_test" / "metrics.json").exists()
    table = (out / "comparison" / "comparison.md").read_text()
    assert "p (" in table, "DeLong p-values of one model against the other"
    summary = (out / "summary.md").read_text()
    assert "| simple_cnn | 0.6558 |  | " in summary and "95 % CI" in summary
    before = _mtimes(out)

    assert main(argv) == 0
    second = capsys.readouterr().out.splitlines()
    steps = [line for line in second if ": cxrfusion " in line]
    assert len(steps) == len(first) and all(line.startswith("skip: ") for line in steps)
    assert _mtimes(out) == before, "a finished step must not touch its outputs"


@pytest.fixture
def nih_folder(tmp_path: Path) -> Path:
    """Enough of an NIH folder to plan with: the label table's name."""
    folder = tmp_path / "nih"
    folder.mkdir()
    (folder / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n")
    return folder


def test_reproduce_refuses_without_a_gpu_unless_allowed(
    nih_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "reproduce"
    assert main(["reproduce", "--data", str(nih_folder), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no CUDA GPU" in error and "--allow-cpu" in error
    assert not out.exists()


def _fake_checkpoints(run: Path, epoch: int, stopped_epoch: int = 0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    state = {
        "EarlyStopping{'monitor': 'val_auc_macro', 'mode': 'max'}": {"stopped_epoch": stopped_epoch}
    }
    for name in ("best.ckpt", "last.ckpt"):
        torch.save({"epoch": epoch, "callbacks": state}, run / name)


def test_an_unfinished_training_resumes_and_a_finished_one_is_skipped(
    nih_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "reproduce"
    (out / "prepared").mkdir(parents=True)
    (out / "prepared" / "split.csv").write_text("written before the checkpoints\n")
    options = reproduce.ReproduceOptions(models=("simple_cnn",), epochs=3)
    train = reproduce.plan(nih_folder, out, options)[1]
    assert train.state() == reproduce.RUN and not train.command().endswith("--resume")

    _fake_checkpoints(out / "simple_cnn", epoch=1)
    assert train.state() == reproduce.RESUME
    assert train.command(train.state()).endswith(" --resume")
    _fake_checkpoints(out / "simple_cnn", epoch=2)
    assert train.state() == reproduce.FINISHED, "the last epoch ran"
    _fake_checkpoints(out / "simple_cnn", epoch=1, stopped_epoch=1)
    assert train.state() == reproduce.FINISHED, "early stopping ended it"


def test_a_folder_made_with_other_settings_is_refused(nih_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "reproduce"
    reproduce.check_settings(nih_folder, out, reproduce.ReproduceOptions(), write=True)
    reproduce.check_settings(
        nih_folder, out, reproduce.ReproduceOptions(models=("fusion",), workers=8), write=True
    )
    with pytest.raises(CxrError, match=r"reproduce.json: .*epochs 25 \(now 2\); use another --out"):
        reproduce.check_settings(nih_folder, out, reproduce.ReproduceOptions(epochs=2), False)
