"""`cxrfusion synth`, `download` and `prepare`: data in, split and cache out."""

from __future__ import annotations

import argparse
from pathlib import Path

from cxrfusion.errors import CxrError


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write built-in phantom radiographs in the NIH layout",
        description="Write synthetic chest radiograph phantoms (label CSV + PNGs, NIH layout) with a "
        "visible sign per pathology and realistic imbalance: the data of `make demo` and the tests.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> None:
    from cxrfusion.data.synthetic import synthesize

    out = synthesize(args.out, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    print(f"wrote {args.n} phantom radiographs to {out}")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    from cxrfusion.data.options import PrepareOptions

    d = PrepareOptions()
    p = sub.add_parser(
        "prepare",
        help="index, split by patient and cache a dataset",
        description="Read the NIH label table, split patients into train/val/test (no patient in two "
        "splits), and build a pre-resized uint8 image cache (parallel, resumable). Writes split.csv, "
        "split_summary.md/.json, images_<size>.npy, label_distribution.png, sample_images.png.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="[KIND:]PATH",
        help="NIH folder (Data_Entry_2017*.csv + images); or chexpert:DIR, mimic:DIR, "
        "padchest:DIR, vindr:DIR, nih:DIR (each dataset's published layout: docs/datasets.md), "
        "repeated to merge datasets into one; or chestmnist[:64|128|224] (MedMNIST, downloaded at "
        "first use; its own split) or a chestmnist*.npz file, alone",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--split",
        choices=("auto", "iterative", "official"),
        default=d.split,
        help="iterative: the report's stratified patient split; official: the dataset's "
        "published split (NIH's lists, CheXpert's valid.csv as test, MIMIC's split file, "
        "VinDr's test set), validation carved out by patient where none is published; auto "
        "(default): official for MIMIC and VinDr with test labels, iterative elsewhere",
    )
    p.add_argument(
        "--patient-fraction",
        type=float,
        default=d.patient_fraction,
        help=f"share of patients kept, seeded (default {d.patient_fraction}, the report's)",
    )
    p.add_argument("--val", type=float, default=d.val, help=f"validation share (default {d.val})")
    p.add_argument("--test", type=float, default=d.test, help=f"test share (default {d.test})")
    p.add_argument("--seed", type=int, default=d.seed, help="split seed (default 0)")
    p.add_argument(
        "--size",
        type=int,
        default=d.size,
        help=f"side of cached images (default {d.size}; keep it above the model input)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="decoding processes (default 1)")
    p.add_argument(
        "--labels-only",
        action="store_true",
        help="write the split only; no image is opened or required",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="exclude missing/unreadable images (listed in excluded.csv) instead of stopping",
    )
    p.add_argument(
        "--uncertain",
        choices=("mask", "zeros", "ones"),
        default=d.uncertain,
        help="CheXpert/MIMIC's uncertain (-1) labels: mask (unknown: not learned, not scored; "
        "default), zeros or ones",
    )
    p.add_argument(
        "--readers",
        default=d.readers,
        metavar="majority|union|any:N",
        help="VinDr: a finding is positive when more than half of the image's readers (majority, "
        "default), any reader (union) or at least N readers (any:N) reported it",
    )
    p.add_argument(
        "--views",
        default=d.views,
        help="views kept: frontal (PA, AP, AP_SUPINE; default), all, or a comma list of PA, AP, "
        "AP_SUPINE, LATERAL, UNKNOWN",
    )
    p.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> None:
    from cxrfusion.data.options import PrepareOptions

    options = PrepareOptions(
        split=args.split,
        patient_fraction=args.patient_fraction,
        val=args.val,
        test=args.test,
        seed=args.seed,
        size=args.size,
        workers=args.workers,
        labels_only=args.labels_only,
        skip_missing=args.skip_missing,
        uncertain=args.uncertain,
        readers=args.readers,
        views=args.views,
    )
    from cxrfusion.data.chestmnist import is_chestmnist

    first = args.data[0]
    plain = len(args.data) == 1 and ":" not in first  # KIND:FOLDER is checked by prepare
    if plain and not (Path(first).is_dir() or is_chestmnist(first)):
        raise CxrError(
            f"{first}: not a data folder, KIND:FOLDER, chestmnist[:SIZE] or a .npz file (--data)"
        )
    from cxrfusion.data.prepare import prepare  # after the cheap checks: it loads pandas, torch

    result = prepare(args.data, args.out, options)
    counts = result.split["split"].value_counts()
    print(
        f"{len(result.split):,} images of {result.split['Patient ID'].nunique():,} patients: "
        + ", ".join(f"{name} {counts.get(name, 0):,}" for name in ("train", "val", "test"))
    )
    if len(result.excluded):
        print(
            f"excluded {len(result.excluded)} missing or unreadable image(s): {args.out}/excluded.csv"
        )
    print("wrote " + ", ".join(str(f) for f in result.files))


def add_download(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a dataset (NIH ChestX-ray14), resumable and verified",
        description="Fetch NIH ChestX-ray14: the label table, the official split lists, the BBox "
        "list and the 12 image archives (~45 GB), resuming partial downloads, checking sizes and "
        "SHA-256 where published, extracting into images_001/images ... (the layout `prepare` "
        "reads). Interrupted work never looks complete; a re-run skips what is done.",
        epilog="example: cxrfusion download nih --out data/nih --only 1 2",
    )
    p.add_argument("dataset", choices=("nih",), help="the dataset (nih)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to fill")
    p.add_argument(
        "--only", type=int, nargs="+", metavar="N", help="archive numbers 1-12 (default: all)"
    )
    p.add_argument("--workers", type=int, default=4, help="files fetched at once (default 4)")
    p.add_argument(
        "--base-url",
        help="a mirror holding the files under their names (default: $CXRFUSION_NIH_BASE_URL, "
        "else NIH's links)",
    )
    p.add_argument(
        "--from",
        dest="from_dir",
        type=Path,
        metavar="DIR",
        help="offline: take the archives and lists from DIR instead of the network",
    )
    p.add_argument(
        "--keep-archives", action="store_true", help="keep each .tar.gz after extraction"
    )
    p.set_defaults(func=_download)


def _download(args: argparse.Namespace) -> None:
    from cxrfusion.data.download import download_nih, summary

    outcomes = download_nih(
        args.out,
        only=args.only,
        workers=args.workers,
        base_url=args.base_url,
        from_dir=args.from_dir,
        keep_archives=args.keep_archives,
    )
    print(summary(outcomes, args.out))
