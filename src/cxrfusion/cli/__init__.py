"""The `cxrfusion` command: parses arguments and calls the library, nothing more.

One module per stage adds its commands (`add_<command>`: the subparser, its options and the
function that runs it): data, training, evaluation, inference. Here: the parser and `main`, where
a user mistake (`CxrError`, a bad path) becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cxrfusion.cli.data import add_download, add_prepare, add_synth
from cxrfusion.cli.evaluation import add_calibrate, add_compare, add_evaluate, add_external
from cxrfusion.cli.inference import add_export, add_predict, add_serve
from cxrfusion.cli.pacs import add_pacs
from cxrfusion.cli.training import add_models, add_reproduce, add_train
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
  cxrfusion pacs poll --run runs/fusion --dicomweb URL --once   # SR + capture back to a PACS
Run `cxrfusion COMMAND --help` for the options of each command."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like the library's: `cxrfusion train: error: ...`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see `{self.prog} --help`)\n")


def _one_line(message: object) -> str:
    return " ".join(str(message).splitlines())


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_synth,
    add_download,
    add_prepare,
    add_models,
    add_train,
    add_evaluate,
    add_calibrate,
    add_compare,
    add_external,
    add_reproduce,
    add_predict,
    add_serve,
    add_export,
    add_pacs,
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
    # pydicom logs every decoder that fails on a bad file with a traceback; the file's one-line
    # error says what matters, and -v shows the rest.
    logging.getLogger("pydicom").propagate = args.verbose
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
