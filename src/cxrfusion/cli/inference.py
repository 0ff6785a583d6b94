"""`cxrfusion predict`, `serve` and `export`: a trained model on new images."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxrfusion.cli.pacs import add_dicom_options, screen_inputs, write_dicom_results
from cxrfusion.errors import CxrError

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_EVERY_INTERFACE = ("0.0.0.0", "::", "")


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
    add_dicom_options(p)
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
    inputs, refused = screen_inputs(args, classifier) if args.strict else (args.inputs, [])
    result = predict_files(
        classifier,
        inputs,
        args.out,
        args.batch_size,
        args.gradcam,
        progress=sys.stderr.isatty(),
    )
    result.failures[:0] = refused
    if args.dicom_out is not None:
        write_dicom_results(args, classifier, result)
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
        "model card), GET /health, and a web page at /. Binds to loopback by default and answers "
        "only the Host names it is bound to. With a token ($CXRFUSION_TOKEN, or --token-file), "
        "/predict and /model need `Authorization: Bearer T` (/ and /health stay open).",
        epilog="example: CXRFUSION_TOKEN=$(cat token) cxrfusion serve --run runs/fusion",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (or ONNX export)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--allowed-hosts",
        metavar="HOSTS",
        help="comma-separated Host header values to answer, e.g. cxr.example.org,*.lan (default: "
        "the --host address, and localhost on loopback; any with --host 0.0.0.0)",
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token required on /predict and /model (default: "
        "$CXRFUSION_TOKEN, if set)",
    )
    token.add_argument(
        "--token",
        help="the token itself: other users can read it in the process list, so prefer "
        "$CXRFUSION_TOKEN or --token-file",
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
        help="requests held at once, decoding, running or waiting; one more gets 503 (default 16)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most requests predicted in one model call; each still gets the answer it would get "
        "alone (default 8; 1: one call per request)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=5,
        help="longest the first request of a batch waits for others, in ms (default 5)",
    )
    p.add_argument(
        "--decode-timeout",
        type=float,
        default=20,
        help="seconds an upload may take to decode before it is refused (default 20)",
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
    token = _serve_token(args)
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        queue_size=args.queue,
        token=token,
        heatmaps=not args.no_heatmaps,
        allowed_hosts=_allowed_hosts(args),
        decode_timeout_s=args.decode_timeout,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
    )
    from cxrfusion.inference.classifier import Classifier  # the engine loads after the checks

    classifier = Classifier.load(
        args.run, engine=args.engine, mc_samples=args.mc_samples, threshold=args.threshold
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.run} at http://{shown}:{args.port}/ (Ctrl-C stops)")
    if args.host not in _LOOPBACK and token is None:
        _warn("listening beyond this machine without a token")
    serve(create_app(classifier, settings), host=args.host, port=args.port)


def _serve_token(args: argparse.Namespace) -> str | None:
    """--token (warned: `ps` shows it) or --token-file's content, else $CXRFUSION_TOKEN."""
    if args.token is not None:
        _warn(
            "--token is visible to other users in the process list; "
            "use $CXRFUSION_TOKEN or --token-file"
        )
        return args.token
    if args.token_file is None:
        return os.environ.get("CXRFUSION_TOKEN")
    try:
        token = args.token_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise CxrError(
            f"--token-file {args.token_file}: cannot read the token ({reason})"
        ) from None
    if not token:
        raise CxrError(f"--token-file {args.token_file}: the file is empty")
    return token


def _allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """--allowed-hosts; else the bound address (and localhost on loopback); any on 0.0.0.0."""
    if args.allowed_hosts is not None:
        return tuple(host.strip() for host in args.allowed_hosts.split(","))
    if args.host in _EVERY_INTERFACE:
        _warn(
            "bound to every interface, so any Host header is answered; "
            "name the server's host names with --allowed-hosts"
        )
        return ("*",)
    bound = f"[{args.host}]" if ":" in args.host else args.host
    return tuple(dict.fromkeys((bound, "localhost"))) if args.host in _LOOPBACK else (bound,)


def _warn(message: str) -> None:
    print(f"cxrfusion serve: warning: {message}", file=sys.stderr)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run to ONNX (features + MC-dropout head), checked against PyTorch",
        description="Export a trained run as two ONNX graphs, features.onnx (run once per image) "
        "and head.onnx (dropout masks as inputs, so MC dropout runs on ONNX Runtime), plus "
        "model.json (labels, input size, normalisation, threshold, temperatures, versions). "
        "ONNX Runtime is checked against PyTorch on the run's first validation images (built-in "
        "phantoms when its cache is not at hand): the export fails, writing nothing, if they "
        "differ by more than 1e-4. With --quantize int8 the features graph is quantised to INT8 "
        "(calibrated on validation images; the head stays FP32) and kept only if its macro AUC on "
        "the validation split is within 0.005 of FP32's.",
        epilog="example: cxrfusion export --run runs/fusion   # then: predict --engine onnx",
    )
    p.add_argument("--run", type=Path, required=True, help="run directory (uses its best.ckpt)")
    p.add_argument("--out", type=Path, help="export folder (default <run>/export)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8: static INT8 features graph, checked against FP32 (default: FP32)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --quantize: keep an INT8 graph that fails the AUC check (recorded in model.json)",
    )
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> None:
    from cxrfusion.inference.export import export_run
    from cxrfusion.inference.quantize import Int8Check

    report = export_run(
        args.run, args.out, opset=args.opset, quantize=args.quantize, force=args.force
    )
    diffs = ", ".join(f"{name} {value:.1e}" for name, value in report.max_abs_diff.items())
    parity = report.metadata["parity"]
    print(
        f"ONNX Runtime vs PyTorch on {parity['source']}, max abs difference: {diffs} "
        f"(tolerance {parity['tolerance']:g})"
    )
    quantization = report.metadata["quantization"]
    if quantization is not None:
        kept = "; kept with --force" if quantization["forced"] else ""
        print(f"{Int8Check(**quantization['check']).summary()}{kept}")
    print(f"wrote {report.folder} (model.json, {', '.join(report.metadata['files'].values())})")
