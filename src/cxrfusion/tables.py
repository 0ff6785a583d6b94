"""Tables as CSV: reading a user's file (every way it can be unreadable becomes one `CxrError`
naming it), and writing ours so that reading them back gives the very same numbers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrfusion.errors import CxrError


def to_csv(table: pd.DataFrame) -> str:
    """`table` as CSV text whose floats round-trip exactly (17 significant digits): metrics
    recomputed from a predictions file equal those computed before it was written, even where
    temperature-scaled probabilities saturate near 0 and 1."""
    return table.to_csv(index=False, float_format="%.17g")


def read_csv(path: Path, what: str, **options: object) -> pd.DataFrame:
    """`pd.read_csv(path, **options)`, with a missing, empty, truncated (.gz), undecodable or
    malformed file as a CxrError that names the file and `what` it should hold.

    Floats are parsed exactly (`float_precision="round_trip"`): pandas before 3.0 parses them
    faster by default, but up to a unit in the last place off, and a probability one ulp off can
    swap an AUC's tie or move an image across a threshold.
    """
    options.setdefault("float_precision", "round_trip")
    try:
        return pd.read_csv(path, **options)
    except FileNotFoundError:
        raise CxrError(f"{path}: file not found, expected {what}") from None
    except pd.errors.EmptyDataError:
        raise CxrError(f"{path}: empty file, expected {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CxrError(f"{path}: not a readable CSV of {what} ({reason})") from None
