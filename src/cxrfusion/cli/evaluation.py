"""`cxrfusion evaluate`, `calibrate` and `compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrfusion.errors import CxrError


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-class AUC with CIs, MC dropout, calibration, Grad-CAM, report.html",
        description="Evaluate a trained run on one split: predictions.csv (mean and std per "
        "pathology, uncertainty, review flag), metrics.json (per-class and macro ROC-AUC with "
        "patient-bootstrap 95 % CIs, AUPRC, sensitivity and specificity at thresholds chosen on "
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
        choices=("test", "val", "train", "all"),
        default="test",
        help="split to evaluate (default test; all: every image, with --prepared only)",
    )
    p.add_argument(
        "--prepared",
        type=Path,
        help="external validation: evaluate on another prepared folder (cached at the run's "
        "cache size) with the run's preprocessing, temperatures and validation thresholds, "
        "scoring only the findings it reports (default out: <run>/external_<name>_<split>)",
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
        prepared=None if args.prepared is None else str(args.prepared),
    )
    if args.prepared is not None:
        _check_prepared(args.prepared)
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


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="decision thresholds and a referral rule with a guaranteed false-negative rate",
        description="Fit, on the run's validation split, per-pathology decision thresholds with "
        "conformal risk control so that each pathology's expected false-negative rate on new "
        "images from the same distribution is at most --alpha, and an uncertainty threshold "
        "above which images are referred, so that the expected share of images kept with a "
        "missed finding is at most --referral-alpha. With --unit patient the exchangeable cases "
        "are patients and both bounds hold for patient-averaged rates (a patient's images are "
        "correlated, so an image-level bound can leak). Writes <run>/calibration.json, which "
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
    p.add_argument(
        "--unit",
        choices=("patient", "image"),
        help="what the guarantee treats as exchangeable (default: patient when a validation "
        "patient has several images, else image)",
    )
    p.add_argument("--seed", type=int, default=0, help="dropout masks and calibration halves")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> None:
    from cxrfusion.evaluation.trust import calibrate_run
    from cxrfusion.stats.conformal import UNITS

    fitted, path = calibrate_run(
        args.run,
        alpha=args.alpha,
        referral_alpha=args.referral_alpha,
        method=args.method,
        mc_samples=args.mc_samples,
        mc_mode=args.mc_mode,
        batch_size=args.batch_size,
        seed=args.seed,
        unit=args.unit,
    )
    refer = fitted.referral_threshold
    print(
        f"thresholds for {UNITS[fitted.unit]} FNR <= {fitted.alpha:g} on "
        f"{fitted.n_calibration} validation images; "
        + ("refer nothing" if refer is None else f"refer uncertainty >= {refer:.4g}")
        + f" (kept-with-a-miss <= {fitted.referral_alpha:g}, {fitted.n_referral} images)"
    )
    print(f"wrote {path}")


def add_compare(sub: argparse._SubParsersAction) -> None:
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


def add_external(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "external",
        help="external validation: a run on its own test split and on another data set, side by side",
        description="Put a run's internal test results beside its results on another prepared "
        "data set (`cxrfusion prepare --data chexpert:...` etc.), per finding both report: "
        "prevalence, ROC-AUC with patient-bootstrap 95 % CIs, the AUC difference (external - "
        "internal) with its CI, sensitivity and specificity at the thresholds chosen on the run's "
        "own validation split, and ECE. Both sides are evaluate folders (eval_<split> and "
        "external_<name>_<split>), made with the options below when missing. Writes "
        "external.md, external.csv, external.html and forest.png, and says so when the "
        "external data shares images or patients with the run's training source.",
        epilog="example: cxrfusion external --run runs/fusion --prepared data/chexpert_prepared",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (uses its best.ckpt)")
    p.add_argument(
        "--prepared", type=Path, required=True, help="the other data set's prepared folder"
    )
    p.add_argument(
        "--split",
        choices=("test", "val", "train", "all"),
        default="test",
        help="its split to score (default test; all: every image, e.g. a test-only data set)",
    )
    p.add_argument(
        "--internal-split",
        choices=("test", "val", "train"),
        default="test",
        help="the run's own split to compare against (default test)",
    )
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (default 25)")
    p.add_argument(
        "--mc-mode", choices=("head", "full"), default="head", help="as in evaluate (default head)"
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="patient-bootstrap resamples (default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of dropout masks and bootstrap")
    p.add_argument("--batch-size", type=int, default=64, help="images per pass (default 64)")
    p.add_argument(
        "--reevaluate",
        action="store_true",
        help="evaluate both sides anew (default: reuse evaluations made with the same options)",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default <run>/external_<name>_<split>/vs_internal)"
    )
    p.set_defaults(func=_external)


def _external(args: argparse.Namespace) -> None:
    if not args.run.exists():
        raise CxrError(f"{args.run}: no such run directory")
    _check_prepared(args.prepared)
    from cxrfusion.evaluation.external import ExternalOptions, external_validation

    options = ExternalOptions(
        split=args.split,
        internal_split=args.internal_split,
        mc_samples=args.mc_samples,
        mc_mode=args.mc_mode,
        seed=args.seed,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        reevaluate=args.reevaluate,
    )
    out = external_validation(args.run, args.prepared, args.out, options)
    print((out / "external.md").read_text())
    print(f"wrote {out / 'external.md'}, external.csv, external.html, forest.png")


def _check_prepared(folder: Path) -> None:
    if not (folder / "split.csv").is_file():
        raise CxrError(f"{folder}: no split.csv: not a prepared folder (--prepared)")
