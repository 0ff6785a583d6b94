"""`cxrfusion prepare`: sources > checked image list > patient-wise split per source > image cache > figures."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.atomic import write_atomic
from cxrfusion.data.cache import build_cache, open_cache
from cxrfusion.data.chestmnist import is_chestmnist, load_chestmnist
from cxrfusion.data.figures import findings_text, plot_label_distribution, plot_sample_grid
from cxrfusion.data.imageio import check_image
from cxrfusion.data.nih import (
    IMAGE_COLUMN,
    PATIENT_COLUMN,
    find_file,
    find_table,
    read_official_lists,
)
from cxrfusion.data.options import PrepareOptions
from cxrfusion.data.sources import SOURCES, parse_spec, read_source
from cxrfusion.data.sources.schema import OFFICIAL_COLUMN, PATH_COLUMN, VIEW_COLUMN
from cxrfusion.data.split import SUMMARY_JSON, make_split, summarise, write_split, write_summary
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What `prepare` wrote."""

    out: Path
    split: pd.DataFrame
    excluded: pd.DataFrame
    files: list[Path]


NOT_FOUND = "listed in the label table but not found"


def _check_images(table: pd.DataFrame) -> pd.DataFrame:
    """Read every listed image's header: all problems are known before long work."""
    problems = []
    for name, path in zip(table[IMAGE_COLUMN], table[PATH_COLUMN], strict=True):
        if not path or not Path(path).is_file():
            problems.append((name, NOT_FOUND))
            continue
        try:
            check_image(path)
        except CxrError as error:
            problems.append((name, str(error)))
    return pd.DataFrame(problems, columns=[IMAGE_COLUMN, "reason"])


def _refuse(where: str, problems: pd.DataFrame) -> CxrError:
    first = problems.iloc[0]
    return CxrError(
        f"{where}: {len(problems)} missing or unreadable image(s), first {first[IMAGE_COLUMN]}: "
        f"{first['reason']}; fix them or pass --skip-missing to exclude them"
    )


def _method(kind: str, table: pd.DataFrame, options: PrepareOptions) -> str:
    """The split method for one source: see `PrepareOptions.split`."""
    published = OFFICIAL_COLUMN in table
    if options.split == "iterative" or (
        options.split == "auto" and not (published and SOURCES[kind].OFFICIAL_BY_DEFAULT)
    ):
        return "iterative"
    if kind == "nih":
        return "official"
    if not published:
        raise CxrError(f"--data {kind}: the dataset publishes no split; pass --split iterative")
    return "published" if (table[OFFICIAL_COLUMN] == "val").any() else "official"


def _official_lists(kind: str, root: Path, table: pd.DataFrame) -> tuple[set[str], set[str]]:
    """(train_val names, test names): NIH's list files, or a source's `official` column."""
    if kind == "nih":
        return read_official_lists(root)
    test = table[OFFICIAL_COLUMN] == "test"
    return set(table[IMAGE_COLUMN][~test]), set(table[IMAGE_COLUMN][test])


def _prepare_source(
    kind: str, root: Path, options: PrepareOptions, namespace: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str], dict]:
    """One source read, filtered by view, checked and split by patient.

    Returns:
        Its split, its excluded images, {image name: file} and its record for the summary.
    """
    table = read_source(kind, root, options)
    frontal = table[VIEW_COLUMN].isin(options.view_set()) | (table[VIEW_COLUMN] == "")
    dropped = int((~frontal).sum())
    table = table[frontal].reset_index(drop=True)
    if namespace:
        table[PATIENT_COLUMN] = kind + ":" + table[PATIENT_COLUMN].astype(str)
    excluded = pd.DataFrame(columns=[IMAGE_COLUMN, "reason"])
    if not options.labels_only:
        excluded = _check_images(table)
        if len(excluded) and not options.skip_missing:
            raise _refuse(f"{kind}:{root}", excluded)
        table = table[~table[IMAGE_COLUMN].isin(excluded[IMAGE_COLUMN])]
    method = _method(kind, table, options)
    split = make_split(
        table,
        method=method,
        patient_fraction=options.patient_fraction,
        val=options.val,
        test=options.test,
        seed=options.seed,
        official_lists=_official_lists(kind, root, table) if method == "official" else None,
    )
    record = {
        "dataset": kind,
        "folder": str(root.resolve()),
        "split": method,
        "images": len(split),
        "other_views_left_out": dropped,
    }
    return split, excluded, dict(zip(table[IMAGE_COLUMN], table[PATH_COLUMN], strict=True)), record


def prepare(
    data: Path | str | Sequence[Path | str],
    out: Path,
    options: PrepareOptions = PrepareOptions(),
) -> Prepared:
    """Index, split and cache one dataset or several merged (see `PrepareOptions`).

    Args:
        data: an NIH folder, `KIND:FOLDER` (chexpert, mimic, padchest, vindr, nih), a list of
            these (merged into one prepared dataset: patients namespaced by source, each source
            split by patient on its own), or ChestMNIST (`chestmnist[:SIZE]` or an .npz) alone.
        out: the prepared folder.
    """
    specs = [data] if isinstance(data, str | Path) else list(data)
    if len(specs) == 1 and is_chestmnist(specs[0]):
        split, source = load_chestmnist(specs[0], out, options.size, options.labels_only)
        excluded = pd.DataFrame(columns=[IMAGE_COLUMN, "reason"])
        return Prepared(out, split, excluded, _write_outputs(out, split, excluded, options, source))
    sources = [parse_spec(spec) for spec in specs]
    namespace = len(sources) > 1 or sources[0][0] != "nih"
    parts = [_prepare_source(kind, root, options, namespace) for kind, root in sources]
    split = pd.concat([part[0] for part in parts], ignore_index=True)
    excluded = pd.concat([part[1] for part in parts], ignore_index=True)
    twice = split[IMAGE_COLUMN].duplicated()
    if twice.any():
        raise CxrError(f"--data: image {split[IMAGE_COLUMN][twice].iloc[0]!r} is in two sources")
    if not options.labels_only:
        files = {name: path for part in parts for name, path in part[2].items()}
        split, excluded = _cache_images(out, split, files, excluded, options)
    return Prepared(
        out,
        split,
        excluded,
        _write_outputs(out, split, excluded, options, _source(sources, parts, options)),
    )


def _source(sources: list[tuple[str, Path]], parts: list, options: PrepareOptions) -> dict:
    """What `split_summary.json` records of the data: every source and every NaN decision."""
    record: dict = {
        "datasets": [part[3] for part in parts],
        "uncertain": options.uncertain,
        "readers": options.readers,
        "views": list(options.view_set()),
    }
    for kind, root in sources:
        if kind == "nih":
            # Recorded so that evaluation finds the files NIH ships beside the table (expert
            # labels, boxes).
            record["table"] = str(Path(find_table(root)).resolve())
    return record


def _cache_images(
    out: Path,
    split: pd.DataFrame,
    files: dict[str, str],
    excluded: pd.DataFrame,
    options: PrepareOptions,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the cache; images that only fail at decoding are refused or excluded like missing ones."""
    names = split[IMAGE_COLUMN].tolist()
    cache = build_cache(
        [Path(files[name]) for name in names],
        out,
        options.size,
        options.workers,
        allow_failures=options.skip_missing,
        names=names,
    )
    if cache.failed:
        failed = pd.DataFrame(list(cache.failed.items()), columns=[IMAGE_COLUMN, "reason"])
        split = split[~split[IMAGE_COLUMN].isin(failed[IMAGE_COLUMN])]
        excluded = pd.concat([excluded, failed], ignore_index=True)
    return split, excluded


def _write_outputs(
    out: Path,
    split: pd.DataFrame,
    excluded: pd.DataFrame,
    options: PrepareOptions,
    source: dict | None = None,
) -> list[Path]:
    summary = summarise(split) | ({"source": source} if source else {})
    files = [write_split(split, out), *write_summary(summary, out)]
    if len(excluded):
        files.append(write_atomic(out / "excluded.csv", excluded.to_csv(index=False)))
    files.append(plot_label_distribution(split, out / "label_distribution.png"))
    if not options.labels_only:
        files.append(_sample_grid(out, split, options))
    log.info("prepared %d images in %s", len(split), out)
    return files


def _sample_grid(out: Path, split: pd.DataFrame, options: PrepareOptions) -> Path:
    cache = open_cache(out, options.size)
    sample = split.sample(n=min(12, len(split)), random_state=options.seed)
    rows = cache.rows_for(sample["Image Index"].tolist(), out)
    titles = [f"{r['Image Index']}\n{findings_text(r)}" for _, r in sample.iterrows()]
    return plot_sample_grid(np.asarray(cache.images[rows]), titles, out / "sample_images.png")


def find_beside_table(prepared: Path, names: tuple[str, ...], option: str) -> Path:
    """A file NIH ships beside its label table (plain or .gz), for the data `prepared` came from.

    Args:
        prepared: folder written by `prepare`; its split_summary.json records the table's path.
        names: accepted file names, without .gz.
        option: the command-line option that names the file explicitly (for the error message).

    Raises:
        CxrError: when the table's folder is unknown or holds none of `names`.
    """
    summary_path = Path(prepared) / SUMMARY_JSON
    try:
        table = json.loads(summary_path.read_text())["source"]["table"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CxrError(
            f"{summary_path}: does not record the NIH table this data came from; pass {option}"
        ) from None
    found = find_file(Path(table).parent, names)
    if found is None:
        raise CxrError(
            f"{Path(table).parent}: no {' or '.join(names)} (plain or .gz); pass {option}"
        )
    return found
