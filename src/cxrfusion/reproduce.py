"""`cxrfusion reproduce`: the report's whole protocol, as the commands a user would type.

prepare (a seeded half of the patients, iterative 70/10/20 split by patient, cache 256 px) > train
the four models (Table 1: `TrainConfig`'s defaults, ImageNet weights, input 224) > evaluate each on
the test split (MC dropout T = 25, patient-bootstrap CIs) > compare (Table 2 with DeLong tests) >
`summary.md` (each model's macro AUC with its CI next to the report's). Every step is a real
`cxrfusion` command line, run in this process through the same library functions as that command.

Resumable: a step is skipped when its outputs exist and are newer than its inputs; a training
with a `last.ckpt` that has not finished (neither its last epoch nor an early stop) resumes from
it (`train --resume`). `reproduce.json` in the output folder holds the settings, so a second call
with other settings cannot mix two protocols in one folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cxrfusion.atomic import write_atomic
from cxrfusion.data.options import PrepareOptions
from cxrfusion.errors import CxrError
from cxrfusion.training.config import TrainConfig

log = logging.getLogger(__name__)

REPORT_MODELS = ("simple_cnn", "densenet121", "efficientnet_b0", "fusion")
# Test macro ROC-AUC: the report's Table 2, and CheXNet (Rajpurkar et al. 2017, DenseNet121 on
# NIH's official split) as the field's reference point.
REPORT_MACRO_AUC = {
    "simple_cnn": 0.6558,
    "densenet121": 0.7096,
    "efficientnet_b0": 0.7363,
    "fusion": 0.8156,
}
CHEXNET_MACRO_AUC = 0.841
# Training images/s that bench/train_step.py measured (its cxrfusion column: batch 32, 224 px,
# AMP) per card, as torch.cuda.get_device_name() names it, then per model. Measured figures only.
# H100: bench/gpu.sh on 2026-11-27 (torch 2.11 + bf16-mixed; `--steps 40 --warmup 5 --rounds 2`).
GPU_THROUGHPUT: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {
        "simple_cnn": 6134.9,
        "efficientnet_b0": 778.0,
        "densenet121": 445.8,
        "fusion": 251.4,
    },
}
MC_SAMPLES = 25  # the report's T
BOOTSTRAP = 1000
FINISHED, RESUME, RUN = "skip", "resume", "run"


@dataclass(frozen=True)
class ReproduceOptions:
    """The report's protocol; every default is the report's setting.

    Args:
        split: "iterative" (the report's) or "official" (NIH's test list).
        models: the models trained, evaluated and compared.
        patient_fraction: share of patients kept (the report's 0.5; ignored by "official").
        cache_size / input_size: side of the cached images and of the model input.
        epochs / batch_size / weights: training overrides (Table 1 / ImageNet by default).
        mc_samples / bootstrap: MC-dropout passes T and patient-bootstrap resamples.
        workers: image-decoding processes (prepare) and loader processes (train).
        seed: seed of the split, training, dropout masks and bootstrap.
    """

    split: str = "iterative"  # the report's protocol, whatever prepare's default
    models: tuple[str, ...] = REPORT_MODELS
    patient_fraction: float = PrepareOptions.patient_fraction
    cache_size: int = TrainConfig.cache_size
    input_size: int = TrainConfig.input_size
    epochs: int = TrainConfig.epochs
    batch_size: int = TrainConfig.batch_size
    weights: str = TrainConfig.weights
    mc_samples: int = MC_SAMPLES
    bootstrap: int = BOOTSTRAP
    workers: int = TrainConfig.workers
    seed: int = TrainConfig.seed


@dataclass(frozen=True)
class Step:
    """One command of the plan.

    Attributes:
        kind: prepare, train, evaluate or compare.
        argv: the command line after `cxrfusion` (without `--resume`).
        settings: what the library function receives (PrepareOptions, TrainConfig, evaluate
            keyword arguments, or the run folders to compare).
        inputs / outputs: files that make the step stale / that it writes last.
        action: runs the step through the library (its argument: resume a training).
    """

    kind: str
    argv: tuple[str, ...]
    settings: object
    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]
    action: Callable[[bool], None]

    def state(self) -> str:
        """FINISHED (outputs up to date), RESUME (an unfinished training) or RUN."""
        if self.kind == "train":
            return _training_state(self.settings)
        return FINISHED if _up_to_date(self.outputs, self.inputs) else RUN

    def command(self, state: str = RUN) -> str:
        resume = ("--resume",) if state == RESUME else ()
        return shlex.join(("cxrfusion", *self.argv, *resume))


def plan(data: Path, out: Path, options: ReproduceOptions = ReproduceOptions()) -> list[Step]:
    """The steps of the protocol, in order, for NIH data in `data` and outputs under `out`."""
    from cxrfusion.data.nih import find_table

    find_table(data)  # a wrong --data stops here, before any plan is shown
    prepared = out / "prepared"
    steps = [_prepare_step(data, prepared, options)]
    runs = [out / model for model in options.models]
    for model, run in zip(options.models, runs, strict=True):
        steps.append(_train_step(prepared, model, run, options))
    for run in runs:
        steps.append(_evaluate_step(run, options))
    steps.append(_compare_step(runs, out / "comparison"))
    return steps


def plan_lines(steps: Sequence[Step], out: Path) -> list[str]:
    """The plan as a shell script: one command per step to run (with `--resume` where a training
    resumes), finished steps commented out as `# done: ...`."""
    lines = []
    for step in steps:
        state = step.state()
        lines.append(("# done: " if state == FINISHED else "") + step.command(state))
    return [*lines, f"# then: {summary_path(out)} (macro AUC with its 95 % CI per model)"]


def summary_path(out: Path) -> Path:
    return out / "summary.md"


def _prepare_step(data: Path, prepared: Path, options: ReproduceOptions) -> Step:
    settings = PrepareOptions(
        split=options.split,
        patient_fraction=options.patient_fraction,
        seed=options.seed,
        size=options.cache_size,
        workers=max(options.workers, 1),
    )
    argv = ["prepare", "--data", str(data), "--out", str(prepared), "--split", options.split]
    if options.split == "iterative":
        argv += ["--patient-fraction", str(settings.patient_fraction)]
        argv += ["--val", str(settings.val), "--test", str(settings.test)]
    else:
        argv += ["--val", str(settings.val)]
    argv += ["--seed", str(settings.seed), "--size", str(settings.size)]
    argv += ["--workers", str(settings.workers)]
    cache = prepared / f"images_{settings.size}.npy"
    outputs = (cache, prepared / "split.csv", prepared / "sample_images.png")
    return Step(
        "prepare", tuple(argv), settings, (), outputs, partial(_prepare, data, prepared, settings)
    )


def _train_step(prepared: Path, model: str, run: Path, options: ReproduceOptions) -> Step:
    """Table 1 is TrainConfig's defaults; one device, because DDP would re-launch this process
    (run the printed command under torchrun for several GPUs: reproduce then skips it)."""
    settings = TrainConfig(
        prepared=str(prepared),
        out=str(run),
        model=model,
        weights=options.weights,
        epochs=options.epochs,
        batch_size=options.batch_size,
        cache_size=options.cache_size,
        input_size=options.input_size,
        workers=options.workers,
        seed=options.seed,
        devices="1",
    )
    argv = ("train", "--prepared", str(prepared), "--model", model, "--out", str(run))
    argv += ("--weights", settings.weights, "--epochs", str(settings.epochs))
    argv += ("--batch-size", str(settings.batch_size), "--cache-size", str(settings.cache_size))
    argv += ("--input-size", str(settings.input_size), "--workers", str(settings.workers))
    argv += ("--seed", str(settings.seed), "--devices", settings.devices)
    outputs = (run / "best.ckpt", run / "last.ckpt")
    return Step(
        "train", argv, settings, (prepared / "split.csv",), outputs, partial(_train, settings)
    )


def _evaluate_step(run: Path, options: ReproduceOptions) -> Step:
    settings = {
        "split": "test",
        "mc_samples": options.mc_samples,
        "bootstrap": options.bootstrap,
        "seed": options.seed,
    }
    argv = ("evaluate", "--run", str(run), "--split", "test")
    argv += ("--mc-samples", str(options.mc_samples), "--bootstrap", str(options.bootstrap))
    argv += ("--seed", str(options.seed))
    folder = run / "eval_test"
    outputs = (folder / "metrics.json", folder / "report.html")
    action = partial(_evaluate, run, settings)
    return Step("evaluate", argv, settings, (run / "best.ckpt",), outputs, action)


def _compare_step(runs: Sequence[Path], out: Path) -> Step:
    argv = ("compare", *(str(r) for r in runs), "--split", "test", "--out", str(out))
    inputs = tuple(r / "eval_test" / "predictions.csv" for r in runs)
    outputs = tuple(out / f"comparison.{ext}" for ext in ("md", "csv", "html"))
    action = partial(_compare, [r / "eval_test" for r in runs], out)
    return Step("compare", argv, tuple(runs), inputs, outputs, action)


def _up_to_date(outputs: Sequence[Path], inputs: Sequence[Path]) -> bool:
    if not all(p.exists() for p in outputs) or not all(p.exists() for p in inputs):
        return False
    newest_input = max((p.stat().st_mtime for p in inputs), default=0.0)
    return min(p.stat().st_mtime for p in outputs) >= newest_input


def _training_state(config: TrainConfig) -> str:
    """FINISHED when last.ckpt is newer than the split and its run reached its last epoch or
    stopped early; RESUME when it exists otherwise; RUN when there is none."""
    run, split = Path(config.out), Path(config.prepared) / "split.csv"
    last = run / "last.ckpt"
    if not last.exists():
        return RUN
    if not _up_to_date([last, run / "best.ckpt"], [split]):
        return RESUME
    import torch

    checkpoint = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    stopped = any(
        state.get("stopped_epoch", 0) > 0
        for name, state in checkpoint.get("callbacks", {}).items()
        if name.startswith("EarlyStopping")
    )
    return FINISHED if stopped or checkpoint["epoch"] + 1 >= config.epochs else RESUME


def check_settings(data: Path, out: Path, options: ReproduceOptions, write: bool) -> None:
    """Refuse to continue a reproduction in `out` made with other data or settings; with `write`,
    record these (the models and worker count may change between calls)."""
    path = out / "reproduce.json"
    settings = {"data": str(Path(data).resolve()), **dataclasses.asdict(options)}
    for free in ("models", "workers"):
        settings.pop(free)
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = [k for k in settings if recorded.get(k) != settings[k]]
        if changed:
            was = ", ".join(f"{k} {recorded.get(k)!r} (now {settings[k]!r})" for k in changed)
            raise CxrError(f"{path}: this folder was made with {was}; use another --out")
    elif write:
        write_atomic(path, json.dumps(settings, indent=2))


def require_gpu(allow_cpu: bool) -> None:
    """A CxrError on a machine without CUDA unless `allow_cpu`: the protocol takes days there."""
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        raise CxrError(
            "no CUDA GPU found: the report's protocol trains 4 models for up to 25 epochs on "
            "about 39,000 images, days on CPUs; run it on a GPU machine, or pass --allow-cpu "
            "(with small settings such as --input-size 64 --epochs 1)"
        )


def gpu_name() -> str | None:
    """This machine's first CUDA card as torch names it (GPU_THROUGHPUT's keys), or None."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def wall_time_lines(data: Path, steps: Sequence[Step], card: str | None) -> list[str]:
    """Expected training time per model from `GPU_THROUGHPUT`, or why there is none.

    Args:
        data: the NIH folder (its label table sizes the training split before `prepare` ran).
        steps: the plan.
        card: this machine's GPU name, preferred when measured; else every measured card is used.
    """
    if not GPU_THROUGHPUT:
        return ["expected wall time: no GPU throughput measured yet (bench/train_step.py)"]
    trains = [s for s in steps if s.kind == "train"]
    images = _training_images(data, steps[0].settings, Path(trains[0].settings.prepared))
    cards = [card] if card in GPU_THROUGHPUT else sorted(GPU_THROUGHPUT)
    lines = []
    for step in trains:
        config: TrainConfig = step.settings
        for name in cards:
            rate = GPU_THROUGHPUT[name].get(config.model)
            if rate is None:
                lines.append(f"{config.model}: no GPU throughput measured yet on {name}")
                continue
            minutes = config.epochs * images / rate / 60
            lines.append(
                f"{config.model}: up to {minutes:,.0f} min on {name} ({config.epochs} epochs x "
                f"{images:,} training images at {rate:,.0f} img/s, bench/train_step.py)"
            )
    return lines


def _training_images(data: Path, options: PrepareOptions, prepared: Path) -> int:
    """Training images: counted in split.csv once prepared, estimated from the table before."""
    from cxrfusion.data.nih import find_table, read_official_lists, read_table

    if (prepared / "split.csv").exists():
        from cxrfusion.data.split import read_split

        return int((read_split(prepared / "split.csv")["split"] == "train").sum())
    if options.split == "official":
        return round(len(read_official_lists(data)[0]) * (1 - options.val))
    images = len(read_table(find_table(data)))
    return round(images * options.patient_fraction * (1 - options.val - options.test))


def run(
    data: Path,
    out: Path,
    options: ReproduceOptions = ReproduceOptions(),
    echo: Callable[[str], None] = log.info,
) -> list[Path]:
    """Run every step that is not up to date, in order; returns the comparison and summary files.

    Args:
        echo: called with one line per step ("skip|run|resume: <command>"), e.g. `print`.
    """
    check_settings(data, out, options, write=True)
    for step in plan(data, out, options):
        state = step.state()
        echo(f"{state}: {step.command(state)}")
        if state != FINISHED:
            step.action(state == RESUME)
    summary = summary_path(out)
    metrics = [out / m / "eval_test" / "metrics.json" for m in options.models]
    if _up_to_date([summary], metrics):
        echo(f"skip: {summary} is up to date")
    else:
        write_summary(options.models, out)
        echo(f"wrote {summary}")
    return [out / "comparison" / "comparison.md", summary]


def _prepare(data: Path, prepared: Path, options: PrepareOptions, resume: bool) -> None:
    from cxrfusion.data.prepare import prepare

    prepare(data, prepared, options)  # resumes an interrupted image cache by itself


def _train(config: TrainConfig, resume: bool) -> None:
    from cxrfusion.training.fit import train

    train(config, resume=resume)


def _evaluate(run: Path, settings: dict, resume: bool) -> None:
    from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate

    evaluate(run, None, EvaluateOptions(**settings))


def _compare(eval_dirs: list[Path], out: Path, resume: bool) -> None:
    from cxrfusion.evaluation.compare import compare_runs, write_comparison

    write_comparison(compare_runs(eval_dirs), out)


def write_summary(models: Sequence[str], out: Path) -> Path:
    """summary.md: each model's test macro AUC with its patient-bootstrap 95 % CI, next to the
    report's figure and CheXNet's (the README's "Reproducing the report" table)."""
    rows = [
        "| model | report | CheXNet | measured (95 % CI) | test images |",
        "|---|---:|---:|---|---:|",
    ]
    for model in models:
        metrics = json.loads((out / model / "eval_test" / "metrics.json").read_text())
        macro = metrics["auc"]["macro"]
        ci = "" if macro["ci_low"] is None else f" ({macro['ci_low']:.4f} - {macro['ci_high']:.4f})"
        report = REPORT_MACRO_AUC.get(model)
        chexnet = CHEXNET_MACRO_AUC if model == "densenet121" else None
        rows.append(
            f"| {model} | {_figure(report)} | {_figure(chexnet)} | {macro['auc']:.4f}{ci} | "
            f"{metrics['counts']['images']:,} |"
        )
    text = (
        "# Reproducing the report\n\nTest macro ROC-AUC. CheXNet (Rajpurkar et al. 2017) is a "
        "DenseNet121 on NIH's official split: a reference point, not a like-for-like figure. "
        "Per-class AUCs and DeLong p-values: comparison/comparison.md; per-model reports: "
        "<model>/eval_test/report.html.\n\n" + "\n".join(rows) + "\n"
    )
    return write_atomic(summary_path(out), text)


def _figure(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
