"""`cxrfusion prepare`: label table > checked image list > patient-wise split > image cache > figures."""

from __future__ import annotations

import json
import logging
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
    find_file,
    find_images,
    find_table,
    read_official_lists,
    read_table,
)
from cxrfusion.data.options import PrepareOptions
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


def _check_images(data_dir: Path, names: list[str]) -> tuple[dict[str, Path], pd.DataFrame]:
    """Find every listed image and read its header: all problems are known before long work."""
    found, missing = find_images(data_dir, names)
    problems = [(name, "listed in the label table but not found") for name in missing]
    for name, path in found.items():
        try:
            check_image(path)
        except CxrError as error:
            problems.append((name, str(error)))
    return found, pd.DataFrame(problems, columns=["Image Index", "reason"])


def _refuse(data_dir: Path, problems: pd.DataFrame) -> CxrError:
    first = problems.iloc[0]
    return CxrError(
        f"{data_dir}: {len(problems)} missing or unreadable image(s), first {first['Image Index']}: "
        f"{first['reason']}; fix them or pass --skip-missing to exclude them"
    )


def prepare(data_dir: Path, out: Path, options: PrepareOptions = PrepareOptions()) -> Prepared:
    """Index, split and cache a dataset in the NIH layout (or ChestMNIST); see `PrepareOptions`."""
    if is_chestmnist(data_dir):
        split, source = load_chestmnist(data_dir, out, options.size, options.labels_only)
        excluded = pd.DataFrame(columns=["Image Index", "reason"])
        return Prepared(out, split, excluded, _write_outputs(out, split, excluded, options, source))
    table_path = find_table(data_dir)
    table = read_table(table_path)
    excluded = pd.DataFrame(columns=["Image Index", "reason"])
    if not options.labels_only:
        found, excluded = _check_images(data_dir, table["Image Index"].tolist())
        if len(excluded) and not options.skip_missing:
            raise _refuse(data_dir, excluded)
        table = table[~table["Image Index"].isin(excluded["Image Index"])]
    lists = read_official_lists(data_dir) if options.split == "official" else None
    split = make_split(
        table,
        method=options.split,
        patient_fraction=options.patient_fraction,
        val=options.val,
        test=options.test,
        seed=options.seed,
        official_lists=lists,
    )
    if not options.labels_only:
        split, excluded = _cache_images(data_dir, out, split, found, excluded, options)
    # Recorded so that evaluation finds the files NIH ships beside the table (expert labels, boxes).
    source = {"table": str(Path(table_path).resolve())}
    return Prepared(out, split, excluded, _write_outputs(out, split, excluded, options, source))


def _cache_images(
    data_dir: Path,
    out: Path,
    split: pd.DataFrame,
    found: dict[str, Path],
    excluded: pd.DataFrame,
    options: PrepareOptions,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the cache; images that only fail at decoding are refused or excluded like missing ones."""
    paths = [found[name] for name in split["Image Index"]]
    cache = build_cache(
        paths, out, options.size, options.workers, allow_failures=options.skip_missing
    )
    if cache.failed:
        failed = pd.DataFrame(list(cache.failed.items()), columns=["Image Index", "reason"])
        split = split[~split["Image Index"].isin(failed["Image Index"])]
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
