"""The `cxrfusion` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cxrfusion.errors import CxrError

EPILOG = """\
typical use:
  cxrfusion synth --out runs/phantoms                       # built-in phantom data (NIH layout)
  cxrfusion prepare --data NIH_DIR --out runs/prepared      # split by patient + image cache
  cxrfusion train --prepared runs/prepared --model fusion --out runs/fusion
  cxrfusion evaluate --run runs/fusion                      # AUC with CIs, MC dropout, report.html
  cxrfusion compare runs/simple_cnn runs/fusion             # the report's Table 2 + DeLong tests
Run `cxrfusion COMMAND --help` for the options of each command."""


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
    from cxrfusion.data.prepare import prepare

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
    "weights": "imagenet (download; default), none, or a local file for air-gapped sites",
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
        epilog="example: cxrfusion train --prepared runs/prepared --model fusion --out runs/fusion",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="YAML file with any of the options below")
    p.add_argument("--data", type=Path, help="NIH folder: run `prepare` into --prepared first")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.ckpt")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "augmentation":
            for key, text in AUGMENTATION_HELP.items():
                p.add_argument(f"--{key.replace('_', '-')}", type=float, default=None, help=text)
            continue
        kind = {bool: _bool, int: int, float: float}.get(type(f.default), str)
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, default=None, help=TRAIN_HELP[f.name]
        )
    p.set_defaults(func=_train)


def train_config(args: argparse.Namespace) -> object:
    """The run's config: defaults < --config YAML < explicit flags."""
    from cxrfusion.training.config import TrainConfig

    if args.resume and args.out and (Path(args.out) / "config.yaml").exists() and not args.config:
        args.config = Path(args.out) / "config.yaml"
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


def _train(args: argparse.Namespace) -> None:
    from cxrfusion.training.fit import best_epoch, train

    config = train_config(args)
    if args.data:
        from cxrfusion.data.options import PrepareOptions
        from cxrfusion.data.prepare import prepare

        prepare(
            args.data,
            Path(config.prepared),
            PrepareOptions(size=config.cache_size, workers=max(config.workers, 1)),
        )
    run_dir = train(config, resume=args.resume)
    epoch, auc = best_epoch(run_dir)
    print(f"best validation macro AUC {auc:.3f} (epoch {epoch}); run directory: {run_dir}")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-class AUC with CIs, MC dropout, calibration, Grad-CAM, report.html",
        description="Evaluate a trained run on one split: predictions.csv (mean and std per "
        "pathology, uncertainty, review flag), metrics.json (per-class and macro ROC-AUC with "
        "patient-bootstrap 95 %% CIs, ECE, Brier, referral curve), figures and a self-contained "
        "report.html.",
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
        help="fit one temperature per class on the validation split",
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
    out = evaluate(args.run or args.checkpoint, args.out, options)
    metrics = json.loads((out / "metrics.json").read_text())
    macro = metrics["auc"]["macro"]
    ci = "n/a" if macro["ci_low"] is None else f"{macro['ci_low']:.3f} - {macro['ci_high']:.3f}"
    print(
        f"macro ROC-AUC {macro['auc']:.4f} (95 % CI {ci}), "
        f"{metrics['uncertainty']['flagged']} of {metrics['counts']['images']} images flagged"
    )
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
        help="the report's Table 2 for any set of runs, with DeLong tests",
        description="Per-class ROC-AUC of several evaluated runs side by side (the report's Table "
        "2) with DeLong p-values of each model against a reference, Holm-corrected across the 14 "
        "classes. Each run must have been evaluated on the same images (`cxrfusion evaluate`).",
        epilog="example: cxrfusion compare runs/simple_cnn runs/fusion --out runs/comparison",
    )
    p.add_argument(
        "runs",
        type=Path,
        nargs="+",
        help="run directories (their eval_<split> folder) or evaluation folders",
    )
    p.add_argument("--split", default="test", help="which eval_<split> folder to read")
    p.add_argument("--reference", help="model name to test against (default: best macro AUC)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/comparison"),
        help="output folder (default runs/comparison)",
    )
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> None:
    from cxrfusion.evaluation.compare import compare_runs, write_comparison

    folders = [
        r / f"eval_{args.split}" if (r / f"eval_{args.split}").is_dir() else r for r in args.runs
    ]
    result = compare_runs(folders, reference=args.reference)
    files = write_comparison(result, args.out)
    print(files[0].read_text())
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


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_synth,
    _add_download,
    _add_prepare,
    _add_models,
    _add_train,
    _add_evaluate,
    _add_calibrate,
    _add_compare,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a user mistake prints one line and exits 2; bugs keep their traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("lightning.pytorch").propagate = False  # it has its own handler
    try:
        args.func(args)
    except CxrError as error:
        print(f"cxrfusion: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxrfusion: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
