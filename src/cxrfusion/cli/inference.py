"""`cxrfusion predict`, `serve` and `export`: a trained model on new images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxrfusion.errors import CxrError


def add_predict(sub: argparse._SubParsersAction) -> None:
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
    table, document, *overlays = result.files
    shown = f" and {len(overlays)} Grad-CAM overlays in {overlays[0].parent}" if overlays else ""
    print(
        f"predicted {len(result.predictions)} image(s), {flagged} flagged for review{referred}; "
        f"results in {table} and {document}{shown}"
    )
    if result.failures:
        total = len(result.failures) + len(result.predictions)
        raise CxrError(f"{len(result.failures)} of {total} input(s) could not be predicted")


def add_serve(sub: argparse._SubParsersAction) -> None:
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
        heatmaps=not args.no_heatmaps,
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


def add_export(sub: argparse._SubParsersAction) -> None:
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
