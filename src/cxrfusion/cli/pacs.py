"""`cxrfusion pacs poll|listen`, and predict's DICOM options (`--dicom-out`, `--strict`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cxrfusion.errors import CxrError

if TYPE_CHECKING:  # the library loads inside the commands, after the arguments are checked
    from cxrfusion.dicom.identity import ModelIdentity
    from cxrfusion.dicom.pipeline import Intake
    from cxrfusion.dicom.rules import Rules
    from cxrfusion.inference.classifier import Classifier
    from cxrfusion.inference.predict import PredictResult

# Third-party loggers that print tracebacks for failures we report on one line (shown with -v).
_QUIET_LOGGERS = ("dicomweb_client", "urllib3", "highdicom", "pynetdicom")
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
        description="PACS integration. `poll`: DICOMweb (QIDO-RS, WADO-RS, STOW-RS). `listen`: "
        "DICOM C-STORE in, C-STORE back. Both are idempotent through a SQLite state file. "
        "Instances the selection rules reject are skipped with their reason; our own outputs "
        "are never read. Results are research use only.",
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
    _add_model_and_state_options(poll)
    poll.set_defaults(func=_poll, parser=poll)

    listen = modes.add_parser(
        "listen",
        help="receive images by DICOM C-STORE and C-STORE the results back",
        description="A C-STORE SCP for a modality or a PACS routing rule. Received instances are "
        "written to a spool folder and answered at once; one worker screens them by the rules, "
        "predicts the accepted radiographs and C-STOREs a TID 1500 SR and a secondary capture "
        "to --send-to. A file stays in the spool until its results are sent: a restart handles "
        "what is left first, and --state keeps anything from being sent twice. Ctrl-C or "
        "SIGTERM stops listening and finishes the instance in hand.",
        epilog="example: cxrfusion pacs listen --run runs/fusion --port 11112 --ae-title "
        "CXRFUSION --send-to ORTHANC@127.0.0.1:4242",
    )
    listen.add_argument("--run", type=Path, required=True, help="run directory (or ONNX export)")
    listen.add_argument(
        "--send-to",
        required=True,
        metavar="AET@HOST:PORT",
        help="where results are C-STOREd, e.g. ORTHANC@127.0.0.1:4242",
    )
    listen.add_argument("--port", type=int, default=11112, help="DICOM port (11112)")
    listen.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1; 0.0.0.0 for every interface, with --allow-ae)",
    )
    listen.add_argument("--ae-title", default="CXRFUSION", help="our AE title (CXRFUSION)")
    listen.add_argument(
        "--allow-ae",
        action="append",
        metavar="AET",
        help="a calling AE title to accept (repeat for several; default: --send-to's)",
    )
    listen.add_argument(
        "--spool",
        type=Path,
        help="folder received instances wait in (default: beside --state, .spool)",
    )
    listen.add_argument(
        "--retry-interval",
        type=float,
        default=60,
        help="seconds between tries of results not sent yet (60)",
    )
    _add_model_and_state_options(listen)
    listen.set_defaults(func=_listen, parser=listen)


def _add_model_and_state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state", type=Path, default=Path("pacs_state.sqlite"), help="SQLite state file"
    )
    p.add_argument(
        "--audit", type=Path, help="JSON-lines audit log (default: beside --state, .audit.jsonl)"
    )
    p.add_argument("--max-attempts", type=int, default=3, help="tries before failed (3)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch", help="default torch")
    p.add_argument("--mc-samples", type=int, default=25, help="MC-dropout passes T (25)")
    _add_identity_options(p)


def _check_identity_options(args: argparse.Namespace) -> Rules:
    """The checks that need no model: the UID root and the rules file."""
    from cxrfusion.dicom.identity import DEFAULT_UID_ROOT, check_uid_root
    from cxrfusion.dicom.rules import load_rules

    check_uid_root(args.uid_root or DEFAULT_UID_ROOT)
    return load_rules(args.rules)


def _intake(args: argparse.Namespace, rules: Rules, **options: object) -> Intake:
    """Load the model, open the state and the audit log: the model loop both modes share."""
    from cxrfusion.dicom.audit import AuditLog
    from cxrfusion.dicom.pipeline import Intake, Processor
    from cxrfusion.dicom.state import State
    from cxrfusion.inference.classifier import Classifier

    classifier = Classifier.load(args.run, engine=args.engine, mc_samples=args.mc_samples)
    processor = Processor(classifier, model_identity(args, classifier), rules)
    state = State(args.state, args.max_attempts)
    audit = AuditLog(args.audit or args.state.with_suffix(".audit.jsonl"))
    return Intake(processor, state, audit, **options)


def _poll(args: argparse.Namespace) -> None:
    from cxrfusion.dicom.dicomweb import AccessRefused, DicomWebSettings, Poller, make_client

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
    rules = _check_identity_options(args)
    intake = _intake(args, rules, fatal=(AccessRefused,), retry_note="next poll")
    poller = Poller(make_client(settings), settings, intake)
    stop = threading.Event()
    handlers = {number: signal.signal(number, _stopper(stop)) for number in _STOP_SIGNALS}
    try:
        counts = poller.run(args.interval, args.once, stop)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        intake.state.close()
    if stop.is_set():
        print("cxrfusion pacs poll: stopped after the instance in hand", file=sys.stderr)
    print(f"pacs poll: {_counts(counts)}; state in {args.state}, audit in {intake.audit.path}")


def _listen(args: argparse.Namespace) -> None:
    from cxrfusion.dicom.dimse import Destination, check_free
    from cxrfusion.dicom.listener import Listener, ListenSettings

    _quiet_third_parties(args.verbose)
    settings = ListenSettings(
        destination=Destination.parse(args.send_to),
        spool=args.spool or args.state.with_suffix(".spool"),
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        allowed=tuple(args.allow_ae or ()),
        retry_s=args.retry_interval,
    )
    rules = _check_identity_options(args)
    check_free(settings.host, settings.port)  # before the model loads: fail in a second
    intake = _intake(args, rules, retry_note=f"within {settings.retry_s:g} s")
    listener = Listener(settings, intake)
    stop = threading.Event()
    handlers = {number: signal.signal(number, _stopper(stop)) for number in _STOP_SIGNALS}
    try:
        listener.start()
        print(
            f"pacs listen: {settings.ae_title} on {settings.host}:{settings.port}, accepting "
            f"{', '.join(settings.allowed)}, results to {settings.destination}; Ctrl-C stops",
            flush=True,
        )
        while listener.running and not stop.wait(0.5):
            pass
    finally:
        try:
            listener.stop()  # a second Ctrl-C interrupts the instance in hand
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            intake.state.close()
    if listener.progress.error is not None:
        raise listener.progress.error
    left = len(listener.spool.pending())
    print(
        f"pacs listen: stopped; {_counts(listener.progress.counts)}; {left} left in "
        f"{settings.spool} for the next start; state in {args.state}, audit in "
        f"{intake.audit.path}"
    )


def _counts(counts: Counter) -> str:
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing new"


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
