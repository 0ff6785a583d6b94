"""Tiny copies of CheXpert, MIMIC-CXR-JPG, PadChest and VinDr-CXR in their published layouts.

Pixels are real NIH radiographs from ../shared/data when present, else the project's phantoms.
Each copy keeps its dataset's quirks: CheXpert's folder prefix in `Path`, -1 and blanks, laterals;
MIMIC's gzipped tables and p10/... tree; PadChest's stringified term lists and 16-bit PNGs with
12-bit values; VinDr's disagreeing readers and MONOCHROME1 DICOMs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
from dicoms import write_dicom
from PIL import Image

from cxrfusion.data.phantoms import render_phantom

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-sample"
SIZE = 64


def pixels(index: int) -> np.ndarray:
    """A 64 px uint8 radiograph: the index-th real NIH sample image, else a phantom."""
    images = sorted((SHARED_SAMPLE / "images").glob("*.png")) if SHARED_SAMPLE.exists() else []
    if images:
        with Image.open(images[index % len(images)]) as image:
            return np.asarray(image.convert("L").resize((SIZE, SIZE)))
    return render_phantom([], seed=index, size=SIZE)


def _jpeg(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(index)).save(path, quality=95)


CHEXPERT_FINDINGS = (
    "No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,"
    "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
    "Support Devices"
)
# Cardiomegaly, Edema, Consolidation, Pneumonia, Atelectasis, Pneumothorax, Pleural Effusion in
# CHEXPERT_FINDINGS order: 1, 0, -1 or blank (each row gets one of these patterns, cycled).
CHEXPERT_PATTERNS = (
    "1.0,,,,,,,,,,,,,1.0",  # No Finding
    ",,1.0,,,-1.0,,,,0.0,,,,",  # Cardiomegaly, Edema uncertain, Pneumothorax negative
    ",,,1.0,,,1.0,,-1.0,,1.0,,,",  # Consolidation, Atelectasis uncertain, Effusion
    ",,0.0,,,1.0,,1.0,,,,,1.0,",  # Edema, Pneumonia
)


def write_chexpert(root: Path, patients: int = 12, valid_patients: int = 3) -> Path:
    """`CheXpert-v1.0-small/` with train.csv, valid.csv and the JPEGs: per patient one frontal
    (AP or PA) and one lateral image."""
    folder = root / "CheXpert-v1.0-small"
    header = f"Path,Sex,Age,Frontal/Lateral,AP/PA,{CHEXPERT_FINDINGS}"
    for table, first, count in (("train", 1, patients), ("valid", 64541, valid_patients)):
        lines = [header]
        for p in range(first, first + count):
            pattern = CHEXPERT_PATTERNS[p % len(CHEXPERT_PATTERNS)]
            study = f"{table}/patient{p:05d}/study1"
            sex = ("Male", "Female")[p % 2]
            lines.append(
                f"{folder.name}/{study}/view1_frontal.jpg,{sex},{40 + p % 50},Frontal,{('AP', 'PA')[p % 2]},{pattern}"
            )
            lines.append(
                f"{folder.name}/{study}/view2_lateral.jpg,{sex},{40 + p % 50},Lateral,,{pattern}"
            )
            _jpeg(folder / study / "view1_frontal.jpg", p)
            _jpeg(folder / study / "view2_lateral.jpg", p + 1)
        (folder / f"{table}.csv").write_text("\n".join(lines) + "\n")
    return folder


def _write_gz(path: Path, table: pd.DataFrame) -> None:
    with gzip.open(path, "wt") as handle:
        table.to_csv(handle, index=False)


def write_mimic(root: Path, subjects: int = 12) -> Path:
    """MIMIC-CXR-JPG: the three gzipped tables and files/p10/p100000NN/sNNN/<dicom_id>.jpg; each
    study has a PA (or a recumbent AP) and a lateral image; MIMIC's split by subject."""
    root.mkdir(parents=True)
    labels, metadata, split = [], [], []
    splits = ("train", "train", "train", "validate", "test")
    for s in range(subjects):
        subject, study = f"100000{s:02d}", f"5{s:07d}"
        pattern = CHEXPERT_PATTERNS[s % len(CHEXPERT_PATTERNS)].split(",")
        labels.append([subject, study, *pattern])
        views = (
            ("PA" if s % 2 else "AP", "Recumbent" if s % 4 == 0 else "Erect"),
            ("LATERAL", "Erect"),
        )
        for v, (view, orientation) in enumerate(views):
            dicom = f"d{s:02d}{v}"
            metadata.append([dicom, subject, study, view, orientation])
            split.append([dicom, study, subject, splits[s % len(splits)]])
            _jpeg(
                root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                s + v,
            )
    findings = CHEXPERT_FINDINGS.split(",")
    _write_gz(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz",
        pd.DataFrame(labels, columns=["subject_id", "study_id", *findings]),
    )
    _write_gz(
        root / "mimic-cxr-2.0.0-metadata.csv.gz",
        pd.DataFrame(
            metadata,
            columns=[
                "dicom_id",
                "subject_id",
                "study_id",
                "ViewPosition",
                "PatientOrientationCodeSequence_CodeMeaning",
            ],
        ),
    )
    _write_gz(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]),
    )
    return root


PADCHEST_TERMS = (
    "['normal']",
    "['pleural effusion', 'cardiomegaly']",
    "['pseudonodule', ' nodule ']",  # a trimmed term; pseudonodule is not a nodule
    "['pseudonodule', 'kyphosis']",
    "['hydropneumothorax', '']",
    "['hiatal hernia', 'infiltrates']",
)
PROJECTIONS = ("PA", "L", "AP_horizontal", "AP", "PA", "COSTAL")


def write_padchest(root: Path, patients: int = 12, broken: bool = True) -> Path:
    """PadChest: the 160K label table and 16-bit PNGs (12-bit values) in folders 0/ and 1/; the
    last image cut short inside its header (unreadable) when `broken`."""
    rows = []
    for i in range(patients * 2):
        patient, folder = i // 2, str(i % 2)
        name = f"{patient:040d}_{i:02d}.png"
        image = (pixels(i).astype(np.uint16) * 16).astype(np.uint16)  # 12-bit values in 16 bits
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / folder / name)
        rows.append(
            {
                "": i,
                "ImageID": name,
                "ImageDir": folder,
                "StudyDate_DICOM": "20150914",
                "PatientID": f"pc{patient:05d}",
                "PatientBirth": f"{1930 + patient}.0",
                "PatientSex_DICOM": "MF"[patient % 2],
                "Projection": PROJECTIONS[i % len(PROJECTIONS)],
                "Labels": PADCHEST_TERMS[i % len(PADCHEST_TERMS)],
            }
        )
    rows.append(dict(rows[-1], **{"": len(rows), "ImageID": "unlabelled.png", "Labels": ""}))
    if broken:
        last = root / rows[-2]["ImageDir"] / rows[-2]["ImageID"]
        last.write_bytes(last.read_bytes()[:20])  # the header cut short
        rows[-2]["Projection"] = "PA"
    _write_gz(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", pd.DataFrame(rows))
    return root


# (image, reader, finding): three readers per training image who disagree.
VINDR_TRAIN = (
    ("a", "R1", "Cardiomegaly"), ("a", "R2", "Cardiomegaly"), ("a", "R3", "No finding"),
    ("b", "R1", "Pleural effusion"), ("b", "R2", "No finding"), ("b", "R3", "No finding"),
    ("c", "R4", "Nodule/Mass"), ("c", "R4", "Pneumothorax"), ("c", "R5", "Pneumothorax"), ("c", "R6", "Pneumothorax"),
    ("d", "R1", "No finding"), ("d", "R2", "No finding"), ("d", "R3", "No finding"),
    ("e", "R1", "Infiltration"), ("e", "R1", "Infiltration"), ("e", "R2", "Atelectasis"), ("e", "R3", "No finding"),
    ("f", "R7", "Pulmonary fibrosis"), ("f", "R8", "Pulmonary fibrosis"), ("f", "R9", "Pleural thickening"),
)  # fmt: skip
VINDR_TEST = (("t1", "Cardiomegaly"), ("t1", "Pleural effusion"), ("t2", "No finding"))


def write_vindr(root: Path) -> Path:
    """VinDr-CXR: train.csv (one row per reader and finding, with boxes), test.csv (consensus)
    and MONOCHROME1 DICOMs in train/ and test/."""
    root.mkdir(parents=True)
    train = pd.DataFrame(VINDR_TRAIN, columns=["image_id", "rad_id", "class_name"])
    train["x_min"] = np.where(train["class_name"] == "No finding", np.nan, 10.0)
    test = pd.DataFrame(VINDR_TEST, columns=["image_id", "class_name"]).assign(rad_id="")
    for folder, table in (("train", train), ("test", test)):
        table.to_csv(root / f"{folder}.csv", index=False)
        (root / folder).mkdir()
        for i, image_id in enumerate(table["image_id"].unique()):
            inverted = (4095 - pixels(i).astype(np.uint16) * 16).astype(np.uint16)
            write_dicom(root / folder / f"{image_id}.dicom", inverted, "MONOCHROME1")
    return root
