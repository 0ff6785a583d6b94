"""`cxrfusion pacs poll|listen`, and predict's DICOM options (`--dicom-out`, `--strict`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cxrfusion.errors import CxrError

if TYPE_CHECKING:  # the library loads inside the commands, after the arguments are checked
    from cxrfusion.dicom.identity import ModelIdentity
    from cxrfusion.inference.classifier import Classifier
    from cxrfusion.inference.predict import PredictResult

# Third-party loggers that print tracebacks for failures we report on one line (shown with -v).
_QUIET_LOGGERS = ("dicomweb_client", "urllib3", "highdicom")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def add_dicom_options(p: argparse.ArgumentParser) -> None:
    """predict's DICOM results and input rules."""
    group = p.add_argument_group("DICOM")
    group.add_argument(
        "--dicom-out",
        type=Path,
        help="write a TID 1500 SR and a Grad-CAM secondary capture per DICOM input into this folder",
    )
    group.add_argument(
        "--strict",
        action="store_true",
        help="refuse DICOM inputs the selection rules reject (default: predict them with a warning)",
    )
    _add_identity_options(group)


def _add_identity_options(group: argparse._ActionsContainer) -> None:
    group.add_argument(
        "--rules", type=Path, help="input selection rules (default: the shipped ones)"
    )
    group.add_argument(
        "--uid-root",
        help="UID prefix of the results (default: pydicom's; set your organisation's)",
    )


def model_identity(args: argparse.Namespace, classifier: Classifier) -> ModelIdentity:
    from cxrfusion.dicom.identity import identify

    return identify(args.run, args.engine, classifier.spec.model, args.uid_root)


def screen_inputs(args: argparse.Namespace, classifier: Classifier) -> tuple[list, list]:
    """With --strict: the inputs the rules accept and the (file, reason) refused."""
    from cxrfusion.dicom.files import screen_files
    from cxrfusion.dicom.rules import load_rules
    from cxrfusion.inference.predict import find_images

    files, missing = find_images(args.inputs)
    accepted, refused = screen_files(
        files, load_rules(args.rules), model_identity(args, classifier)
    )
    if not accepted:
        reason = (refused or missing or [("", "no image in the inputs")])[0][1]
        raise CxrError(f"nothing to predict: {reason}")
    return accepted, missing + refused


def write_dicom_results(
    args: argparse.Namespace, classifier: Classifier, result: PredictResult
) -> None:
    """--dicom-out: results for the DICOM inputs; sources lacking attributes join the failures."""
    from cxrfusion.dicom.files import write_file_results

    model = model_identity(args, classifier)
    written, failures = write_file_results(classifier, result.predictions, args.dicom_out, model)
    result.failures.extend(failures)
    print(f"wrote {len(written)} DICOM result(s) (SR + secondary capture) to {args.dicom_out}")


def add_pacs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pacs",
        help="read radiographs from a PACS and write SR + secondary capture results back",
        description="PACS integration. `poll`: DICOMweb (QIDO-RS, WADO-RS, STOW-RS), idempotent "
        "through a SQLite state file. Instances the selection rules reject are skipped with "
        "their reason; our own outputs are never read. Results are research use only.",
    )
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    poll = modes.add_parser(
        "poll",
        help="poll a DICOMweb server",
        description="Find new instances with QIDO-RS, fetch them with WADO-RS, predict the "
        "accepted radiographs and store a TID 1500 SR and a Grad-CAM secondary capture in each "
        "one's study with STOW-RS. Every instance is recorded once in --state (processed, "
        "skipped or failed, with its reason); a second run writes nothing new.",
        epilog="example: cxrfusion pacs poll --run runs/fusion --dicomweb "
        "http://127.0.0.1:8042/dicom-web --once",
    )
    poll.add_argument("--run", type=Path, required=True, help="run directory (or ONNX export)")
    poll.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb root URL")
    poll.add_argument("--user", help="HTTP basic user (with --password)")
    poll.add_argument("--password", help="HTTP basic password (or $CXRFUSION_PACS_PASSWORD)")
    poll.add_argument("--token", help="bearer token (or $CXRFUSION_PACS_TOKEN)")
    poll.add_argument("--interval", type=float, default=10, help="seconds between polls (10)")
    poll.add_argument("--once", action="store_true", help="process what is there and exit")
    poll.add_argument(
        "--state", type=Path, default=Path("pacs_state.sqlite"), help="SQLite state file"
    )
    poll.add_argument(
        "--audit", type=Path, help="JSON-lines audit log (default: beside --state, .audit.jsonl)"
    )
    poll.add_argument("--max-attempts", type=int, default=3, help="tries before failed (3)")
    poll.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="default torch")
    poll.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (25)")
    _add_identity_options(poll)
    poll.set_defaults(func=_poll, parser=poll)


def _poll(args: argparse.Namespace) -> None:
    from cxrfusion.dicom.audit import AuditLog
    from cxrfusion.dicom.dicomweb import DicomWebSettings, Poller, make_client
    from cxrfusion.dicom.identity import DEFAULT_UID_ROOT, check_uid_root
    from cxrfusion.dicom.pipeline import Processor
    from cxrfusion.dicom.rules import load_rules
    from cxrfusion.dicom.state import State

    _quiet_third_parties(args.verbose)
    if args.interval <= 0:
        raise CxrError(f"--interval must be > 0 seconds, got {args.interval}")
    settings = DicomWebSettings(
        url=args.dicomweb,
        user=args.user,
        password=args.password
        or (os.environ.get("CXRFUSION_PACS_PASSWORD") if args.user else None),
        token=args.token or os.environ.get("CXRFUSION_PACS_TOKEN"),
    )
    check_uid_root(args.uid_root or DEFAULT_UID_ROOT)
    rules = load_rules(args.rules)
    from cxrfusion.inference.classifier import Classifier  # the model loads after the checks

    classifier = Classifier.load(args.run, engine=args.engine, mc_samples=args.mc_samples)
    processor = Processor(classifier, model_identity(args, classifier), rules)
    state = State(args.state, args.max_attempts)
    audit = AuditLog(args.audit or args.state.with_suffix(".audit.jsonl"))
    poller = Poller(make_client(settings), settings, processor, state, audit)
    stop = threading.Event()
    handlers = {number: signal.signal(number, _stopper(stop)) for number in _STOP_SIGNALS}
    try:
        counts = poller.run(args.interval, args.once, stop)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        state.close()
    if stop.is_set():
        print("cxrfusion pacs poll: stopped after the instance in hand", file=sys.stderr)
    shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing new"
    print(f"pacs poll: {shown}; state in {args.state}, audit in {audit.path}")


def _stopper(stop: threading.Event) -> Callable[..., None]:
    """Ctrl-C or SIGTERM: finish the instance in hand, then stop; a second Ctrl-C interrupts."""

    def handler(*_: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    return handler


def _quiet_third_parties(verbose: bool) -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).propagate = verbose
        if not verbose:
            logging.getLogger(name).addHandler(logging.NullHandler())
