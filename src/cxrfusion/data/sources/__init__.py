"""One reader per dataset, each giving the table of `schema.py`; a registry instead of `if` chains.

`--data KIND:PATH` names a source (`chexpert:data/CheXpert-v1.0-small`); a plain path is NIH.
Each reader module has `NAME`, `OFFICIAL_BY_DEFAULT` (whether `--split auto` takes its published
split) and `read_source(root, options) -> DataFrame`.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources import chexpert, mimic, nih, padchest, vindr
from cxrfusion.data.sources.schema import check_table
from cxrfusion.errors import CxrError

SOURCES: dict[str, ModuleType] = {m.NAME: m for m in (nih, chexpert, mimic, padchest, vindr)}


def parse_spec(spec: str | Path) -> tuple[str, Path]:
    """`KIND:PATH` (or a plain NIH path) as (kind, folder).

    Raises:
        CxrError: an unknown kind, or a folder that does not exist.
    """
    text = str(spec)
    kind, sep, rest = text.partition(":")
    if not sep or kind not in SOURCES:
        if sep and kind.isalpha() and len(kind) > 1:
            raise CxrError(f"--data {text}: unknown dataset {kind!r} ({', '.join(SOURCES)})")
        kind, rest = "nih", text
    root = Path(rest)
    if not root.is_dir():
        raise CxrError(f"--data {text}: no such folder")
    return kind, root


def read_source(kind: str, root: Path, options: PrepareOptions) -> pd.DataFrame:
    """The source's table, checked against the schema."""
    return check_table(SOURCES[kind].read_source(root, options), f"{kind}:{root}")
