"""DICOM results and input rules as specifications: the SR is TID 1500 that highdicom reads back
with our codes, the capture burns in the disclaimer, the source is never touched, and the rules
accept frontal chest radiographs only."""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicoms import BASIC_TEXT_SR, chest_dx, dicom_bytes
from PIL import Image

from cxrfusion.cli import main
from cxrfusion.dicom import codes
from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.dicom.results import dicom_results
from cxrfusion.dicom.rules import evaluate, load_rules
from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import Prediction
from cxrfusion.labels import LABELS

WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9)
MODEL = ModelIdentity(run="demo", architecture="fusion", sha256="ab" * 32)


@pytest.fixture
def source(nih_sample) -> pydicom.Dataset:
    pixels = np.asarray(Image.open(nih_sample / "images" / "00000013_019.png").convert("L"))
    return chest_dx(pixels)


def _prediction(source: pydicom.Dataset) -> Prediction:
    p = np.linspace(0.05, 0.95, len(LABELS))
    return Prediction(
        source="scan.dcm",
        probability=p,
        std=p / 20,
        entropy=p,
        mutual_information=p / 10,
        uncertainty=0.02,
        flag=False,
        warning="",
        image=source.pixel_array[::2, ::2].copy(),
        labels=LABELS,
    )


def test_sr_reads_back_as_tid_1500_with_our_codes_and_the_numbers(source) -> None:
    before = source.to_json_dict()
    prediction = _prediction(source)
    sr = dicom_results(prediction, source, MODEL, WHEN, ["mc_samples=25"]).sr
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(_roundtrip(sr)))
    assert source.to_json_dict() == before
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.VerificationFlag == "UNVERIFIED" and "RESEARCH USE" in sr.SeriesDescription
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID.startswith(MODEL.uid_root)
    assert sr.Manufacturer == "cxrfusion" and sr.ManufacturerModelName == "fusion"
    assert MODEL.version in sr.SoftwareVersions
    assert MODEL.device_uid in str(sr.ContentSequence)  # the device observer's UID
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(LABELS) + 1
    for i, (label, group) in enumerate(zip(LABELS, groups, strict=False)):
        assert group.finding_type == codes.PATHOLOGY_CODES[label]
        assert group.source_images[0].referenced_sop_instance_uid == source.SOPInstanceUID
        values = {
            m.derivation.value if m.derivation else m.name.value: m.value
            for m in group.get_measurements()
        }
        assert values[codes.MEAN.value] == pytest.approx(prediction.probability[i])
        assert values[codes.STANDARD_DEVIATION.value] == pytest.approx(prediction.std[i])
        assert values[codes.THRESHOLD.value] == 0.5
        [decision] = group.get_qualitative_evaluations()
        assert decision.value == (
            codes.PRESENT if prediction.probability[i] >= 0.5 else codes.ABSENT
        )
    image = groups[-1]
    assert image.finding_type == codes.IMAGE_FINDING
    assert image.get_qualitative_evaluations()[0].value == codes.NO


def test_capture_is_rgb_with_burnt_in_text_referencing_the_source(source) -> None:
    sc = dicom_results(_prediction(source), source, MODEL, WHEN).sc
    sc = pydicom.dcmread(_roundtrip(sc))
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.pixel_array.shape[2] == 3 and "RESEARCH USE" in sc.SeriesDescription


def test_same_inputs_same_objects_other_settings_other_uids(source) -> None:
    one = dicom_results(_prediction(source), source, MODEL, WHEN, ["seed=0"])
    two = dicom_results(_prediction(source), source, MODEL, WHEN, ["seed=0"])
    other = dicom_results(_prediction(source), source, MODEL, WHEN, ["seed=1"])
    assert _roundtrip(one.sr).getvalue() == _roundtrip(two.sr).getvalue()
    assert one.sc.SOPInstanceUID == two.sc.SOPInstanceUID != other.sc.SOPInstanceUID


def test_missing_patient_study_or_spacing_attributes_are_all_named(source) -> None:
    del source.PatientBirthDate, source.AccessionNumber, source.ImagerPixelSpacing
    with pytest.raises(CxrError, match="PatientBirthDate, AccessionNumber, ImagerPixelSpacing"):
        dicom_results(_prediction(source), source, MODEL, WHEN)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"ViewPosition": "LL"}, "ViewPosition LL"),
        ({"Modality": "CT"}, "Modality CT"),
        ({"Modality": "OT"}, "Modality OT"),
        ({"BodyPartExamined": "ABDOMEN"}, "BodyPartExamined ABDOMEN"),
        ({"NumberOfFrames": 2}, "NumberOfFrames 2"),
        ({"SamplesPerPixel": 3}, "SamplesPerPixel 3"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "FOR PROCESSING"),
        ({"Manufacturer": "cxrfusion"}, "our own output"),
    ],
)
def test_rules_reject_what_is_not_a_frontal_chest_radiograph(source, changes, reason) -> None:
    for keyword, value in changes.items():
        setattr(source, keyword, value)
    decision = evaluate(load_rules(), source, MODEL)
    assert not decision.accepted and reason in decision.reason


def test_rules_accept_a_frontal_dx_and_warn_without_a_view(source) -> None:
    assert evaluate(load_rules(), source, MODEL) == (decision := evaluate(load_rules(), source))
    assert decision.accepted and not decision.warnings
    del source.ViewPosition, source.BodyPartExamined
    decision = evaluate(load_rules(), source)
    assert decision.accepted and decision.warnings == ("ViewPosition missing",)


def test_our_own_sr_is_never_read(source) -> None:
    sr = dicom_results(_prediction(source), source, MODEL, WHEN).sr
    del sr.Manufacturer
    assert "our own output" in evaluate(load_rules(), sr, MODEL).reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("checks: [{attribute: Modalty, in: [DX]}]", "not a DICOM keyword"),
        ("checks: [{attribute: Modality, in: [DX], regex: D.}]", "exactly one of"),
        ("checks: [{attribute: Modality, regex: '('}]", "bad regex"),
        ("checks: [{attribute: Modality, in: [DX], missing: maybe}]", "missing must be one of"),
        ("rules: []", "one key, `checks`"),
    ],
)
def test_a_bad_rules_file_is_refused_naming_the_problem(tmp_path, text, message) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(CxrError, match=message):
        load_rules(path)


def test_predict_writes_dicom_results_and_strict_refuses_decoys(
    mc_dropout_run, source, tmp_path, capsys
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "frontal.dcm").write_bytes(dicom_bytes(source))
    lateral = chest_dx(source.pixel_array, ViewPosition="LL")
    (folder / "lateral.dcm").write_bytes(dicom_bytes(lateral))
    report = chest_dx(source.pixel_array, Modality="SR", SOPClassUID=BASIC_TEXT_SR)
    del report.PixelData
    (folder / "report.dcm").write_bytes(dicom_bytes(report))
    args = ["predict", "--run", str(mc_dropout_run), str(folder), "--out", str(tmp_path / "p")]
    assert main([*args, "--dicom-out", str(tmp_path / "dicom"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "ViewPosition LL" in err and "Modality SR" in err
    written = sorted((tmp_path / "dicom").glob("*.dcm"))
    assert sorted(pydicom.dcmread(p).Modality for p in written) == ["OT", "SR"]
    assert (folder / "frontal.dcm").read_bytes() == dicom_bytes(source)
    (folder / "report.dcm").unlink()
    assert main(args) == 0  # without --strict the lateral is predicted, with its warning
    assert "LL" in (tmp_path / "p" / "predictions.csv").read_text()


def _roundtrip(dataset: pydicom.Dataset):
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_model_identity_is_checked_on_creation() -> None:
    with pytest.raises(ValueError, match="sha256"):
        ModelIdentity(run="r", architecture="a", sha256="xyz")
    with pytest.raises(CxrError, match="uid-root"):
        ModelIdentity(run="r", architecture="a", sha256="0" * 64, uid_root="1.02.3")
