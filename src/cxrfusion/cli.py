"""The `cxrfusion` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from cxrfusion.errors import CxrError

log = logging.getLogger("cxrfusion")

EPILOG = """\
typical use:
  cxrfusion synth --out runs/phantoms                       # built-in phantom data (NIH layout)
  cxrfusion prepare --data NIH_DIR --out runs/prepared      # split by patient + image cache
  cxrfusion train --prepared runs/prepared --model fusion --out runs/fusion
  cxrfusion evaluate --run runs/fusion                      # AUC with CIs, MC dropout, report.html
  cxrfusion compare runs/simple_cnn runs/fusion             # Table 2 + patient-clustered DeLong
  cxrfusion reproduce --data NIH_DIR --dry-run              # the report's whole protocol (GPU)
  cxrfusion predict --run runs/fusion scans/ --out preds    # probabilities, uncertainty, review flag
  cxrfusion serve --run runs/fusion                         # HTTP API + web page on 127.0.0.1:8000
Run `cxrfusion COMMAND --help` for the options of each command."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like the library's: `cxrfusion train: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).splitlines())


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write built-in phantom radiographs in the NIH layout",
        description="Write synthetic chest radiograph phantoms (label CSV + PNGs, NIH layout) with a "
        "visible sign per pathology and realistic imbalance: the data of `make demo` and the tests.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> None:
    from cxrfusion.data.synthetic import synthesize

    out = synthesize(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    print(f"wrote {args.n} phantom radiographs to {out}")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.data.options import PrepareOptions

    d = PrepareOptions()
    p = sub.add_parser(
        "prepare",
        help="index, split by patient and cache a dataset",
        description="Read the NIH label table, split patients into train/val/test (no patient in two "
        "splits), and build a pre-resized uint8 image cache (parallel, resumable). Writes split.csv, "
        "split_summary.md/.json, images_<size>.npy, label_distribution.png, sample_images.png.",
    )
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="NIH folder (Data_Entry_2017*.csv + images), or chestmnist[:64|128|224] (MedMNIST, "
        "downloaded at first use; its own split) or a chestmnist*.npz file",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--split",
        choices=("iterative", "official"),
        default=d.split,
        help="iterative: the report's stratified patient split (default); official: "
        "NIH's train_val_list.txt/test_list.txt, validation carved out by patient",
    )
    p.add_argument(
        "--patient-fraction",
        type=float,
        default=d.patient_fraction,
        help=f"share of patients kept, seeded (default {d.patient_fraction}, the report's)",
    )
    p.add_argument("--val", type=float, default=d.val, help=f"validation share (default {d.val})")
    p.add_argument("--test", type=float, default=d.test, help=f"test share (default {d.test})")
    p.add_argument("--seed", type=int, default=d.seed, help="split seed (default 0)")
    p.add_argument(
        "--size",
        type=int,
        default=d.size,
        help=f"side of cached images (default {d.size}; keep it above the model input)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="decoding processes (default 1)")
    p.add_argument(
        "--labels-only",
        action="store_true",
        help="write the split only; no image is opened or required",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="exclude missing/unreadable images (listed in excluded.csv) instead of stopping",
    )
    p.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> None:
    from cxrfusion.data.options import PrepareOptions

    options = PrepareOptions(
        split=args.split,
        patient_fraction=args.patient_fraction,
        val=args.val,
        test=args.test,
        seed=args.seed,
        size=args.size,
        workers=args.workers,
        labels_only=args.labels_only,
        skip_missing=args.skip_missing,
    )
    chestmnist = str(args.data).startswith("chestmnist") or args.data.suffix == ".npz"
    if not (args.data.is_dir() or chestmnist):
        raise CxrError(f"{args.data}: no such data folder (--data)")
    from cxrfusion.data.prepare import prepare  # after the cheap checks: it loads pandas, torch

    result = prepare(args.data, args.out, options)
    counts = result.split["split"].value_counts()
    print(
        f"{len(result.split):,} images of {result.split['Patient ID'].nunique():,} patients: "
        + ", ".join(f"{name} {counts.get(name, 0):,}" for name in ("train", "val", "test"))
    )
    if len(result.excluded):
        print(
            f"excluded {len(result.excluded)} missing or unreadable image(s): {args.out}/excluded.csv"
        )
    print("wrote " + ", ".join(str(f) for f in result.files))


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the models with their parameter counts",
        description="List the registered models with total parameters and the parameters trained in "
        "phase 1 (backbone frozen) and phase 2 (all layers). Any timm backbone name also works.",
    )
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> None:
    from cxrfusion.models import count_parameters, create_model, list_models

    print(f"{'model':<18}{'total':>14}{'phase 1':>14}{'phase 2':>14}")
    for name in list_models():
        counts = count_parameters(create_model(name, weights="none"))
        print(
            f"{name:<18}{counts['total']:>14,}{counts['phase1_trainable']:>14,}{counts['phase2_trainable']:>14,}"
        )


TRAIN_HELP = {
    "prepared": "folder written by `cxrfusion prepare` (default runs/prepared)",
    "out": "run directory (default runs/<model>)",
    "model": "simple_cnn, densenet121, efficientnet_b0, fusion or any timm name (see `models`)",
    "weights": "imagenet (download; default), none, a local file for air-gapped sites, or "
    "torchxrayvision:densenet121-res224-all (-nih, -pc, -chex, -rsna, -mimic_nb, -mimic_ch): "
    "chest-X-ray weights for densenet121 (fusion's DenseNet; needs the [txrv] extra), "
    "torchxrayvision:FILE for a local state dict of theirs",
    "loss": "focal (default), bce or asl",
    "focal_alpha": "focal weight of positives: 0.25 weights positives at 0.25, negatives at 0.75",
    "focal_gamma": "focal exponent (default 2)",
    "epochs": "maximum epochs over both phases (default 25)",
    "phase1_epochs": "epochs with the backbone frozen at --lr (default 5)",
    "lr": "phase-1 learning rate, Adam (default 1e-3)",
    "phase2_lr": "learning rate of all layers in phase 2 (default 1e-5)",
    "min_lr": "floor of reduce-on-plateau (default 1e-5)",
    "plateau_patience": "epochs without a better val AUC before the rate drops (default 2)",
    "plateau_factor": "rate multiplier on plateau (default 0.1)",
    "early_stop_patience": "epochs without a better val macro AUC before stopping (default 5)",
    "batch_size": "images per batch (default 32)",
    "cache_size": "side of the cached images to read (default 256)",
    "input_size": "side of the model input (default 224)",
    "workers": "data loader processes (default 4)",
    "seed": "seed of everything random (default 0)",
    "accelerator": "auto, cpu, gpu ... (passed to Lightning)",
    "devices": "auto, a count, or a list such as 0,1 (Lightning)",
    "num_nodes": "nodes for multi-node DDP (torchrun/SLURM)",
    "strategy": "auto, ddp, ... (Lightning)",
    "precision": "auto (bf16/fp16 AMP on GPU, fp32 on CPU), 32-true, 16-mixed, bf16-mixed",
    "channels_last": "NHWC memory layout (faster convolutions)",
    "limit_train_batches": "fraction or number of training batches per epoch (quick runs)",
    "logger": "csv (default) or tensorboard: Lightning's step log in <out>/logs/ "
    "(`tensorboard --logdir <out>/logs`); metrics.csv is written either way",
}
AUGMENTATION_HELP = {
    "flip": "probability of a horizontal flip (default 0.5)",
    "rotate_deg": "random rotation range in degrees (default 10)",
    "zoom": "random zoom range, relative (default 0.1)",
    "brightness": "random brightness range, relative (default 0.1)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.training.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="train a model (two phases, checkpoints, curves)",
        description="Train one model with PyTorch Lightning: phase 1 trains the head on a frozen "
        "backbone, phase 2 fine-tunes all layers; checkpoints and early stopping follow the "
        "validation macro ROC-AUC. Defaults are the report's Table 1. Precedence: defaults < "
        "--config YAML < flags. The run directory holds config.yaml, split.csv, metrics.csv, "
        "loss_curves.png, best.ckpt and last.ckpt.",
        epilog="examples:\n"
        "  cxrfusion train --prepared runs/prepared --model fusion --out runs/fusion\n"
        "  torchrun --standalone --nproc-per-node 4 -m cxrfusion.cli train --prepared "
        "runs/prepared \\\n      --model fusion --accelerator gpu --devices 4 --strategy ddp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument(
        "--data",
        type=Path,
        help="NIH folder: run `prepare` into --prepared first (rank 0 only; other ranks wait)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.ckpt, with its own config.yaml",
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name == "augmentation":
            for key, text in AUGMENTATION_HELP.items():
                p.add_argument(f"--{key.replace('_', '-')}", type=float, default=None, help=text)
            continue
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=None, help=TRAIN_HELP[f.name]
        )
    p.set_defaults(func=_train, check=_check_train)


def train_config(args: argparse.Namespace) -> object:
    """The run's config: defaults < --config YAML < explicit flags.

    With --resume the base is the run's own config.yaml (in --out, default runs/<model>): flags
    may change how it goes on (e.g. --epochs, --devices), not which model it trains.
    """
    from cxrfusion.training.config import TrainConfig

    if args.resume:
        if args.config:
            raise CxrError("--config with --resume: a resumed run reads its own config.yaml")
        run_dir = Path(args.out or f"runs/{args.model or TrainConfig().model}")
        source = run_dir / "config.yaml"
        if not source.is_file():
            raise CxrError(f"{source}: no run to resume (no config.yaml); train without --resume")
        config = TrainConfig.from_yaml(source)
        if args.model is not None and args.model != config.model:
            raise CxrError(f"--model {args.model}: the run in {run_dir} trains {config.model}")
        args.out = str(run_dir)  # the directory it is in now, wherever it was started
    else:
        config = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    flags = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if f.name != "augmentation" and getattr(args, f.name) is not None
    }
    config = dataclasses.replace(config, **flags)
    augmentation = {k: getattr(args, k) for k in AUGMENTATION_HELP if getattr(args, k) is not None}
    config.augmentation = {**config.augmentation, **augmentation}
    if args.out is None and not args.config:
        config.out = f"runs/{config.model}"
    return config


def _check_train(args: argparse.Namespace) -> None:
    """The config and the folders it names, checked before Lightning loads: mistakes show at once."""
    from cxrfusion.training.config import check_can_run

    config = train_config(args)
    prepared, out = Path(config.prepared), Path(config.out)
    if args.resume and not (out / "last.ckpt").is_file():
        raise CxrError(f"{out}: no last.ckpt to resume; train without --resume first")
    if not args.data and not (prepared / "split.csv").is_file():
        raise CxrError(
            f"{prepared}: no split.csv; run `cxrfusion prepare --out {prepared}` or pass --data"
        )
    chestmnist = str(args.data).startswith("chestmnist") or str(args.data).endswith(".npz")
    if args.data and not (Path(args.data).is_dir() or chestmnist):
        raise CxrError(f"{args.data}: no such data folder (--data)")
    check_can_run(config)


def _train(args: argparse.Namespace) -> None:
    from cxrfusion.training.fit import best_epoch, train
    from cxrfusion.training.launch import launch_rank, prepare_once

    config = train_config(args)
    if args.data:
        from cxrfusion.data.options import PrepareOptions

        options = PrepareOptions(size=config.cache_size, workers=max(config.workers, 1))
        prepare_once(args.data, Path(config.prepared), options)  # rank 0 only; others wait
    run_dir = train(config, resume=args.resume)
    if launch_rank() == 0:
        epoch, auc = best_epoch(run_dir)
        print(f"best validation macro AUC {auc:.3f} (epoch {epoch}); run directory: {run_dir}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-class AUC with CIs, MC dropout, calibration, Grad-CAM, report.html",
        description="Evaluate a trained run on one split: predictions.csv (mean and std per "
        "pathology, uncertainty, review flag), metrics.json (per-class and macro ROC-AUC with "
        "patient-bootstrap 95 %% CIs, AUPRC, sensitivity and specificity at thresholds chosen on "
        "validation, subgroup AUCs by sex, age band and view, ECE, Brier, referral curve), "
        "figures and a self-contained report.html, written into a temporary folder renamed into "
        "place when complete.",
        epilog="example: cxrfusion evaluate --run runs/fusion --temperature-scale",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", type=Path, help="run directory (uses its best.ckpt)")
    where.add_argument("--checkpoint", type=Path, help="a checkpoint inside a run directory")
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="split to evaluate (default test)",
    )
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (default 25)")
    p.add_argument(
        "--mc-mode",
        choices=("head", "full"),
        default="head",
        help="head: backbone once + T head passes (fast, default); full: T whole passes",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.1,
        help="flag images whose uncertainty (mean of the 14 stds) exceeds this "
        "(default 0.1, the report's)",
    )
    p.add_argument(
        "--temperature-scale",
        action="store_true",
        help="fit one temperature per class on the validation split's MC-dropout logits, "
        "apply it to every sample and save it as <run>/temperature.json",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="patient-bootstrap resamples for the CIs (default 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of dropout masks and bootstrap")
    p.add_argument("--batch-size", type=int, default=64, help="images per pass (default 64)")
    p.add_argument(
        "--examples",
        type=int,
        default=4,
        help="images shown in the prediction grid and explained by Grad-CAM",
    )
    p.add_argument(
        "--labels",
        choices=("google2019",),
        help="also score against Google's 2019 radiologist labels (images that have them)",
    )
    p.add_argument(
        "--labels-file",
        help="google2019_nih-chest-xray-labels.csv[.gz] (default: beside the NIH table)",
    )
    p.add_argument(
        "--boxes",
        nargs="?",
        const="",
        metavar="PATH",
        help="Grad-CAM against NIH's boxes: pointing game and mass inside per finding "
        "(default file: BBox_List_2017.csv[.gz] beside the NIH table)",
    )
    p.add_argument("--out", type=Path, help="output folder (default <run>/eval_<split>)")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    run = args.run or args.checkpoint
    if not run.exists():
        raise CxrError(f"{run}: no such {'run directory' if args.run else 'checkpoint'}")
    from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate

    options = EvaluateOptions(
        split=args.split,
        mc_samples=args.mc_samples,
        mc_mode=args.mc_mode,
        threshold=args.threshold,
        temperature_scale=args.temperature_scale,
        bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        examples=args.examples,
        labels=args.labels,
        labels_file=args.labels_file,
        boxes=args.boxes,
    )
    out = evaluate(run, args.out, options)
    metrics = json.loads((out / "metrics.json").read_text())
    macro = metrics["auc"]["macro"]
    ci = "n/a" if macro["ci_low"] is None else f"{macro['ci_low']:.3f} - {macro['ci_high']:.3f}"
    ci += f", {macro['n_valid']} of {metrics['auc']['n_resamples']} resamples valid"
    print(
        f"macro ROC-AUC {macro['auc']:.4f} (95 % CI {ci}), "
        f"{metrics['uncertainty']['flagged']} of {metrics['counts']['images']} images flagged"
    )
    for note in metrics["notes"]:
        print(f"note: {note}")
    print(f"report: {out / 'report.html'}")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="decision thresholds and a referral rule with a guaranteed false-negative rate",
        description="Fit, on the run's validation split, per-pathology decision thresholds with "
        "conformal risk control so that each pathology's expected false-negative rate on new "
        "images from the same distribution is at most --alpha, and an uncertainty threshold "
        "above which images are referred, so that the expected share of images kept with a "
        "missed finding is at most --referral-alpha. Writes <run>/calibration.json, which "
        "evaluate then checks on its split.",
        epilog="example: cxrfusion calibrate --run runs/fusion --alpha 0.1",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (uses its best.ckpt)")
    p.add_argument("--alpha", type=float, default=0.1, help="false-negative bound (default 0.1)")
    p.add_argument(
        "--referral-alpha",
        type=float,
        default=0.05,
        help="bound on the share of kept images with a missed finding (default 0.05)",
    )
    p.add_argument("--method", choices=("crc",), default="crc", help="conformal risk control")
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (default 25)")
    p.add_argument(
        "--mc-mode", choices=("head", "full"), default="head", help="as in evaluate (default head)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per pass (default 64)")
    p.add_argument("--seed", type=int, default=0, help="dropout masks and calibration halves")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> None:
    from cxrfusion.evaluation.trust import calibrate_run

    fitted, path = calibrate_run(
        args.run,
        alpha=args.alpha,
        referral_alpha=args.referral_alpha,
        method=args.method,
        mc_samples=args.mc_samples,
        mc_mode=args.mc_mode,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    refer = fitted.referral_threshold
    print(
        f"thresholds for FNR <= {fitted.alpha:g} on {fitted.n_calibration} validation images; "
        + ("refer nothing" if refer is None else f"refer uncertainty >= {refer:.4g}")
        + f" (kept-with-a-miss <= {fitted.referral_alpha:g}, {fitted.n_referral} images)"
    )
    print(f"wrote {path}")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="the report's Table 2 for any set of runs, with patient-clustered DeLong tests",
        description="Per-class ROC-AUC of several evaluated runs side by side (the report's Table "
        "2) with p-values of each model against a reference: DeLong's paired test clustered by "
        "patient (Obuchowski 1997), Holm-corrected across the 14 classes. Each run must have been "
        "evaluated on the same images (`cxrfusion evaluate`).",
        epilog="example: cxrfusion compare runs/simple_cnn runs/fusion --out runs/comparison",
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        help="run directories (their eval_<split> folder) or evaluation folders",
    )
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which eval_<split> folder to read (default test)",
    )
    p.add_argument(
        "--reference",
        help="the model the others are tested against: one of the runs given (its folder or "
        "name); default the first run (never picked from the test results)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/comparison"),
        help="output folder (default runs/comparison)",
    )
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> None:
    if len(args.runs) < 2:
        raise CxrError(f"compare needs two or more runs, got {len(args.runs)}: {args.runs[0]}")
    for run in args.runs:
        if not run.is_dir():
            raise CxrError(f"{run}: no such run or evaluation folder")
    from cxrfusion.evaluation.compare import compare_runs, write_comparison

    folders = [
        r / f"eval_{args.split}" if (r / f"eval_{args.split}").is_dir() else r for r in args.runs
    ]
    result = compare_runs(folders, reference=args.reference)
    files = write_comparison(result, args.out)
    print(files[0].read_text())
    print(f"reference: {result.reference}; p: patient-clustered DeLong, Holm-corrected")
    print("wrote " + ", ".join(str(f) for f in files))


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a dataset (NIH ChestX-ray14), resumable and verified",
        description="Fetch NIH ChestX-ray14: the label table, the official split lists, the BBox "
        "list and the 12 image archives (~45 GB), resuming partial downloads, checking sizes and "
        "SHA-256 where published, extracting into images_001/images ... (the layout `prepare` "
        "reads). Interrupted work never looks complete; a re-run skips what is done.",
        epilog="example: cxrfusion download nih --out data/nih --only 1 2",
    )
    p.add_argument("dataset", choices=("nih",), help="the dataset (nih)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to fill")
    p.add_argument(
        "--only", type=int, nargs="+", metavar="N", help="archive numbers 1-12 (default: all)"
    )
    p.add_argument("--workers", type=int, default=4, help="files fetched at once (default 4)")
    p.add_argument(
        "--base-url",
        help="a mirror holding the files under their names (default: $CXRFUSION_NIH_BASE_URL, "
        "else NIH's links)",
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        metavar="DIR",
        help="offline: take the archives and lists from DIR instead of the network",
    )
    p.add_argument(
        "--keep-archives", action="store_true", help="keep each .tar.gz after extraction"
    )
    p.set_defaults(func=_download)


def _download(args: argparse.Namespace) -> None:
    from cxrfusion.data.download import download_nih, summary

    outcomes = download_nih(
        args.out,
        only=args.only,
        workers=args.workers,
        base_url=args.base_url,
        from_dir=args.from_dir,
        keep_archives=args.keep_archives,
    )
    print(summary(outcomes, args.out))


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.reproduce import REPORT_MODELS, ReproduceOptions

    d = ReproduceOptions()
    p = sub.add_parser(
        "reproduce",
        help="the report's whole protocol on a GPU machine: prepare, train 4, evaluate, compare",
        description="Run the report's protocol end to end: prepare (half the patients, iterative "
        "70/10/20 split by patient, cache 256), train simple_cnn, densenet121, efficientnet_b0 "
        "and fusion with Table 1 (ImageNet weights, 224 px), evaluate each on the test split "
        "(MC dropout T=25, patient-bootstrap CIs), compare (Table 2, DeLong) and write "
        "summary.md. Resumable: finished steps are skipped, an interrupted training resumes "
        "from its last.ckpt. Trains on one GPU; for several, run the printed train commands "
        "under torchrun and rerun reproduce, which skips them. The options below shrink the run "
        "for a quick check.",
        epilog="example: cxrfusion reproduce --data NIH_DIR --out runs/reproduce --dry-run",
    )
    p.add_argument("--data", type=Path, required=True, help="NIH folder (see `prepare`)")
    p.add_argument(
        "--out", type=Path, default=Path("runs/reproduce"), help="output folder (runs/reproduce)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan of commands; run nothing")
    p.add_argument(
        "--allow-cpu", action="store_true", help="run without a CUDA GPU (small settings only)"
    )
    p.add_argument(
        "--split", choices=("iterative", "official"), default=d.split, help="see `prepare`"
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(d.models),
        help=f"models to train and compare (default: {' '.join(REPORT_MODELS)})",
    )
    for name, kind, text in (
        ("patient_fraction", float, "share of patients kept"),
        ("cache_size", int, "side of the cached images"),
        ("input_size", int, "side of the model input"),
        ("epochs", int, "maximum training epochs"),
        ("batch_size", int, "training batch size"),
        ("weights", str, "backbone weights (see `train --help`)"),
        ("mc_samples", int, "MC-dropout passes T"),
        ("bootstrap", int, "patient-bootstrap resamples for the CIs"),
        ("workers", int, "decoding and loader processes"),
        ("seed", int, "seed of split, training and evaluation"),
    ):
        default = getattr(d, name)
        p.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{text} ({default})"
        )
    p.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> None:
    from cxrfusion import reproduce

    options = reproduce.ReproduceOptions(
        split=args.split,
        models=tuple(args.models),
        patient_fraction=args.patient_fraction,
        cache_size=args.cache_size,
        input_size=args.input_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        weights=args.weights,
        mc_samples=args.mc_samples,
        bootstrap=args.bootstrap,
        workers=args.workers,
        seed=args.seed,
    )
    if not args.dry_run:
        reproduce.require_gpu(args.allow_cpu)
    reproduce.check_settings(args.data, args.out, options, write=False)
    steps = reproduce.plan(args.data, args.out, options)
    for line in reproduce.wall_time_lines(args.data, steps, reproduce.gpu_name()):
        print(f"# {line}")
    if args.dry_run:
        print("\n".join(reproduce.plan_lines(steps, args.out)))
        return
    files = reproduce.run(args.data, args.out, options, echo=lambda line: print(line, flush=True))
    print("results: " + ", ".join(str(f) for f in files))


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict PNG/JPEG/DICOM files with a trained run",
        description="Predict radiographs (files, folders searched recursively, glob patterns) with "
        "a trained run: per pathology the MC-dropout mean probability and std, the uncertainty "
        "score and the review flag, in predictions.csv and predictions.json (and Grad-CAM "
        "overlays with --gradcam). Each image goes through exactly the preprocessing the model "
        "was trained on. An unreadable file is reported on one line and skipped; the exit status "
        "is 2 when any file failed.",
        epilog="example: cxrfusion predict --run runs/fusion scans/ 'more/*.dcm' --out preds",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (uses its best.ckpt)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument(
        "--out", type=Path, default=Path("predictions"), help="output folder (default predictions)"
    )
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (default 25)")
    p.add_argument(
        "--threshold",
        type=float,
        help="flag images whose uncertainty exceeds this (default: the run's evaluated "
        "threshold, else 0.1)",
    )
    p.add_argument("--gradcam", action="store_true", help="write Grad-CAM overlays")
    p.add_argument("--batch-size", type=int, default=32, help="images per pass (default 32)")
    p.add_argument(
        "--engine",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: the run's checkpoint (default); onnx: its `cxrfusion export`",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the dropout masks (default 0)")
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> None:
    from cxrfusion.inference.classifier import Classifier
    from cxrfusion.inference.predict import predict_files

    classifier = Classifier.load(
        args.run,
        engine=args.engine,
        mc_samples=args.mc_samples,
        threshold=args.threshold,
        seed=args.seed,
    )
    result = predict_files(
        classifier,
        args.inputs,
        args.out,
        args.batch_size,
        args.gradcam,
        progress=sys.stderr.isatty(),
    )
    for _, reason in result.failures:
        print(f"cxrfusion predict: skipped {reason}", file=sys.stderr)
    flagged = sum(p.flag for p in result.predictions)
    calibration = classifier.spec.calibration
    referred = (
        ""
        if calibration is None
        else f", {sum(p.referred for p in result.predictions)} referred under the conformal "
        f"guarantee (referral alpha = {calibration.referral_alpha:g}, "
        f"false-negative rate <= {calibration.alpha:g} per pathology)"
    )
    print(
        f"predicted {len(result.predictions)} image(s), {flagged} flagged for review{referred}; "
        f"results in {args.out / 'predictions.csv'} and {args.out / 'predictions.json'}"
    )
    if result.failures:
        total = len(result.failures) + len(result.predictions)
        raise CxrError(f"{len(result.failures)} of {total} input(s) could not be predicted")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="HTTP API and a web page for single studies",
        description="Serve a trained run over HTTP (FastAPI + uvicorn): POST /predict (multipart "
        "PNG/JPEG/DICOM in field `file`; `?heatmap=true` adds Grad-CAM overlays), GET /model (the "
        "model card), GET /health, and a web page at /. Binds to loopback by default; with "
        "--token, /predict and /model need `Authorization: Bearer T` (/ and /health stay open).",
        epilog="example: cxrfusion serve --run runs/fusion --port 8000",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (or ONNX export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--token",
        default=os.environ.get("CXRFUSION_TOKEN"),
        help="bearer token required on /predict and /model (default: $CXRFUSION_TOKEN, if set)",
    )
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="default torch")
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (default 25)")
    p.add_argument("--threshold", type=float, help="review-flag threshold (default: the run's own)")
    p.add_argument(
        "--max-upload-mb", type=float, default=20, help="largest accepted image (default 20)"
    )
    p.add_argument(
        "--queue",
        type=int,
        default=16,
        help="requests held at once, running or waiting; one more gets 503 (default 16)",
    )
    p.add_argument(
        "--no-heatmaps", action="store_true", help="refuse Grad-CAM requests (always with onnx)"
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from cxrfusion.serving.app import ServeSettings, create_app
    from cxrfusion.serving.server import serve

    if not 0 < args.port < 65536:
        raise CxrError(f"--port must be between 1 and 65535, got {args.port}")
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        queue_size=args.queue,
        token=args.token,
        heatmaps=not args.no_heatmaps and args.engine == "torch",  # Grad-CAM needs torch
    )
    from cxrfusion.inference.classifier import Classifier  # the engine loads after the checks

    classifier = Classifier.load(
        args.run, engine=args.engine, mc_samples=args.mc_samples, threshold=args.threshold
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.run} at http://{shown}:{args.port}/ (Ctrl-C stops)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.token is None:
        print(
            "cxrfusion serve: warning: listening beyond this machine without --token",
            file=sys.stderr,
        )
    serve(create_app(classifier, settings), host=args.host, port=args.port)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run to ONNX (features + MC-dropout head), checked against PyTorch",
        description="Export a trained run as two ONNX graphs, features.onnx (run once per image) "
        "and head.onnx (dropout masks as inputs, so MC dropout runs on ONNX Runtime), plus "
        "model.json (labels, input size, normalisation, threshold, temperatures, versions). "
        "ONNX Runtime is checked against PyTorch on the run's first validation images (built-in "
        "phantoms when its cache is not at hand): the export fails, writing nothing, if they "
        "differ by more than 1e-4.",
        epilog="example: cxrfusion export --run runs/fusion   # then: predict --engine onnx",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (uses its best.ckpt)")
    p.add_argument("--out", type=Path, help="export folder (default <run>/export)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    from cxrfusion.inference.export import export_run

    report = export_run(args.run, args.out, opset=args.opset)
    diffs = ", ".join(f"{name} {value:.1e}" for name, value in report.max_abs_diff.items())
    parity = report.metadata["parity"]
    print(
        f"ONNX Runtime vs PyTorch on {parity['source']}, max abs difference: {diffs} "
        f"(tolerance {parity['tolerance']:g})"
    )
    print(f"wrote {report.folder} (model.json, features.onnx, head.onnx)")


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_synth,
    _add_download,
    _add_prepare,
    _add_models,
    _add_train,
    _add_evaluate,
    _add_calibrate,
    _add_compare,
    _add_reproduce,
    _add_predict,
    _add_serve,
    _add_export,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cxrfusion",
        description="Train, evaluate and explain multi-label chest X-ray classifiers (NIH "
        "ChestX-ray14, 14 pathologies) with calibrated uncertainty.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.set_defaults(parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user mistake prints one line and exits 2; bugs keep their traceback."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the command's parser, which names the command and its --help
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = args.parser.prog
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False  # each has its own handler
    try:
        if hasattr(args, "check"):
            args.check(args)
        args.func(args)
    except CxrError as error:
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        log.info("where it came from (-v):", exc_info=True)
        return 2
    except OSError as error:  # a path the user gave: missing, not writable, a file not a folder
        where = f"{error.filename}: " if error.filename else ""
        print(f"{prog}: error: {where}{error.strerror or error}", file=sys.stderr)
        log.info("where it came from (-v):", exc_info=True)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
