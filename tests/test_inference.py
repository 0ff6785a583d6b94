"""Specifications for the Python API: a file predicted by `Classifier` gets exactly the numbers
`evaluate` gives the same image from the cache, whatever form the file takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from realdata import prepare_real, split_images, train_tiny
from scipy.special import expit, logit
from torch import nn

from cxrfusion import Classifier
from cxrfusion.errors import CxrError
from cxrfusion.evaluation.evaluate import EvaluateOptions, evaluate
from cxrfusion.inference.classifier import Predictions
from cxrfusion.labels import LABELS
from cxrfusion.stats.temperature import write_temperature


@pytest.fixture(scope="module")
def real_prepared(nih_sample, tmp_path_factory) -> Path:
    return prepare_real(nih_sample, tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def real_run(real_prepared) -> Path:
    """The simple CNN, 1 epoch on 40 real radiographs (cache 192 px, input 160 px). It has no
    dropout, so its MC-dropout prediction is deterministic: comparing it with evaluate isolates
    the path from file to model input, which is what must not differ."""
    return train_tiny(real_prepared, real_prepared.parent / "simple_cnn", "simple_cnn")


@pytest.fixture(scope="module")
def dropout_run(real_prepared) -> Path:
    """timm's tiny test_efficientnet under the report's MC-dropout head, 1 epoch."""
    return train_tiny(real_prepared, real_prepared.parent / "dropout", "test_efficientnet")


def _sample_images(run: Path, nih_sample: Path, n: int) -> list[Path]:
    return split_images(run, nih_sample)[:n]


def test_api_on_real_radiographs_equals_evaluate_from_the_cache(real_run, nih_sample, tmp_path):
    out = evaluate(real_run, tmp_path / "eval", EvaluateOptions(bootstrap=10, examples=1))
    expected = pd.read_csv(out / "predictions.csv")
    files = split_images(real_run, nih_sample)
    assert [f.name for f in files] == expected["Image Index"].tolist() and len(files) >= 4

    got = Classifier.load(real_run, device="cpu").predict_many(files).to_frame()

    np.testing.assert_allclose(got[list(LABELS)], expected[list(LABELS)], atol=1e-5, rtol=0)
    std_columns = [f"{label}_std" for label in LABELS]
    np.testing.assert_allclose(got[std_columns], expected[std_columns], atol=1e-5, rtol=0)
    assert got["flag"].tolist() == expected["flag"].tolist()


def test_api_with_mc_dropout_equals_evaluate_for_the_same_seed_and_batches(
    dropout_run, nih_sample, tmp_path
):
    """Batch k is seeded seed + k in both, so the dropout masks too are evaluate's."""
    options = EvaluateOptions(bootstrap=10, examples=1, batch_size=4, seed=3)
    expected = pd.read_csv(evaluate(dropout_run, tmp_path / "eval", options) / "predictions.csv")
    files = split_images(dropout_run, nih_sample)
    assert len(files) > 4  # two batches at least
    stds = [f"{label}_std" for label in LABELS]
    assert expected[stds].to_numpy().mean() > 1e-3  # the masks matter

    def predicted(seed: int) -> pd.DataFrame:
        classifier = Classifier.load(dropout_run, device="cpu", seed=seed)
        return classifier.predict_many(files, batch_size=4).to_frame()

    got = predicted(3)
    np.testing.assert_allclose(got[list(LABELS)], expected[list(LABELS)], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[stds], expected[stds], atol=1e-5, rtol=0)
    assert np.abs(predicted(4)[stds] - expected[stds]).to_numpy().max() > 1e-3


def _dicom(path: Path, stored: np.ndarray, photometric: str, **elements: object) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _full_range(image_path: Path) -> np.ndarray:
    """A real radiograph stretched to 0..255, so a DICOM of it decodes to the same 8 bits."""
    pixels = np.asarray(Image.open(image_path), dtype=np.float64)
    return np.rint((pixels - pixels.min()) * 255 / (pixels.max() - pixels.min())).astype(np.uint8)


def test_png_dicom_and_array_of_the_same_pixels_give_the_same_probabilities(
    real_run, nih_sample, tmp_path
):
    pixels = _full_range(split_images(real_run, nih_sample)[0])
    png = tmp_path / "same.png"
    Image.fromarray(pixels).save(png)
    sources = [
        png,
        _dicom(tmp_path / "mono2.dcm", pixels.astype(np.uint16) * 16, "MONOCHROME2"),
        _dicom(
            tmp_path / "mono1.dcm",
            (255 - pixels.astype(np.uint16)) * 16,
            "MONOCHROME1",
            ViewPosition="LL",  # predicted all the same, but with a warning
        ),
        ("upload.dcm", (tmp_path / "mono1.dcm").read_bytes()),
        pixels,
    ]
    clf = Classifier.load(real_run, device="cpu")
    predictions = [clf.predict(source) for source in sources]
    for other in predictions[1:]:
        np.testing.assert_allclose(other.probability, predictions[0].probability, atol=1e-4)
        np.testing.assert_array_equal(other.image, predictions[0].image)
    assert [p.source for p in predictions[3:]] == ["upload.dcm", "array[0]"]
    warnings = Predictions(predictions).to_frame()["warning"].tolist()
    assert warnings[:2] == ["", ""] and warnings[4] == ""
    assert all("ViewPosition LL: not a frontal chest view" in w for w in warnings[2:4])


def test_saved_temperatures_divide_the_logits(real_run, nih_sample, tmp_path):
    run = shutil.copytree(real_run, tmp_path / "run")
    image = split_images(run, nih_sample)[0]
    plain = Classifier.load(run, device="cpu").predict(image).probability
    temperatures = dict(zip(LABELS, np.linspace(0.5, 3.0, len(LABELS)).tolist(), strict=True))
    write_temperature(run, np.array(list(temperatures.values())), fitted_on={"split": "val"})

    clf = Classifier.load(run, device="cpu")
    scaled = clf.predict(image).probability

    expected = expit(logit(plain) / np.array(list(temperatures.values())))
    np.testing.assert_allclose(scaled, expected, atol=1e-6)
    assert clf.card()["temperatures"] == temperatures


def test_a_temperature_file_without_every_label_is_a_user_error(real_run, tmp_path):
    run = shutil.copytree(real_run, tmp_path / "run")
    (run / "temperature.json").write_text(json.dumps({"temperature": {"Atelectasis": 1.5}}))
    with pytest.raises(CxrError, match="temperature.json"):
        Classifier.load(run, device="cpu")


def test_mc_dropout_spread_sets_the_review_flag_at_the_threshold(dropout_run, nih_sample):
    images = _sample_images(dropout_run, nih_sample, 6)
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=20)
    predictions = clf.predict_many(images, batch_size=4)
    uncertainty = np.array([p.uncertainty for p in predictions])
    assert np.all(uncertainty > 0)  # dropout is active: the samples differ
    middle = float(np.median(uncertainty))
    strict = Classifier.load(dropout_run, device="cpu", mc_samples=20, threshold=middle)
    flags = strict.predict_many(images, batch_size=4)
    assert [p.flag for p in flags] == (uncertainty > middle).tolist()
    again = clf.predict_many(images, batch_size=4)
    np.testing.assert_array_equal(again[2].probability, predictions[2].probability)


class _OneByOne(nn.Module):
    """A backbone run image by image: features that cannot depend on the rest of the batch."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.inner = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1]) for i in range(len(x))])


def test_independent_masks_give_each_image_of_a_batch_its_prediction_alone(dropout_run, nih_sample):
    """What the service's batches rely on: with `independent=True` an image's numbers do not
    depend on its neighbours, to the last bit once the features are the same (a batched
    backbone rounds differently: within 1e-6), and alone they are `predict`'s."""
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=10)
    images = _sample_images(dropout_run, nih_sample, 5)
    prepared = [clf.prepare(path) for path in images]
    alone = [clf.predict_prepared([image], independent=True)[0] for image in prepared]
    keys = ("probability", "std", "entropy", "mutual_information")
    for path, prediction in zip(images, alone, strict=True):
        for key in keys:
            np.testing.assert_array_equal(getattr(prediction, key), getattr(clf.predict(path), key))

    batched = clf.predict_prepared(prepared, independent=True)
    for got, expected in zip(batched, alone, strict=True):
        np.testing.assert_allclose(got.probability, expected.probability, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.std, expected.std, rtol=0, atol=1e-6)

    clf.engine.model.features = _OneByOne(clf.engine.model.features)
    batched = clf.predict_prepared(prepared, independent=True)
    for got, expected in zip(batched, alone, strict=True):
        for key in keys:
            np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
        assert (got.uncertainty, got.flag) == (expected.uncertainty, expected.flag)
    # One generator for the whole batch (evaluate's way) gives other masks, other numbers.
    shared = clf.predict_prepared(prepared)
    assert max(np.abs(s.std - a.std).max() for s, a in zip(shared, alone, strict=True)) > 1e-3


def test_mc_mean_is_close_to_the_deterministic_prediction(dropout_run, nih_sample):
    """Inverted dropout keeps the expected activation: with many samples the mean probability
    lies near the dropout-off prediction (a broken fast path, e.g. dropout off or features
    resampled, would not keep both this and a positive spread)."""
    images = _sample_images(dropout_run, nih_sample, 4)
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=200)
    mean = np.stack([p.probability for p in clf.predict_many(images)])
    prepared = [clf.prepare(path) for path in images]
    x = clf.model_input(np.stack([p.image for p in prepared]))
    deterministic = expit(clf.engine.logits(x))
    np.testing.assert_allclose(mean, deterministic, atol=0.03)


def test_gradcam_heatmaps_cover_the_most_probable_findings(dropout_run, nih_sample):
    image = _sample_images(dropout_run, nih_sample, 1)[0]
    prediction = Classifier.load(dropout_run, device="cpu", mc_samples=5).predict(
        image, gradcam=True
    )
    top = [LABELS[i] for i in np.argsort(-prediction.probability, kind="stable")[:3]]
    assert list(prediction.heatmaps) == top
    for heatmap in prediction.heatmaps.values():
        assert heatmap.shape == prediction.image.shape
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    document = prediction.to_dict(heatmap_png=True)
    assert [p["label"] for p in document["pathologies"]] == list(LABELS)
    assert set(document["heatmaps"]) == set(top)
    json.dumps(document)  # JSON-ready


def test_undecodable_sources_raise_a_user_error_naming_them(dropout_run, tmp_path):
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=2)
    with pytest.raises(CxrError, match="scan.png"):
        clf.predict(("scan.png", b"not an image at all"))
    with pytest.raises(CxrError, match="array"):
        clf.predict(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(CxrError, match="missing.dcm"):
        clf.predict(tmp_path / "missing.dcm")


def test_a_blank_image_is_predicted_with_a_warning(dropout_run):
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=2)
    blank, noisy = np.full((300, 300), 17, np.uint8), np.arange(90000).reshape(300, 300) % 251
    predictions = clf.predict_many([blank, noisy.astype(np.uint8)])
    assert predictions[0].warning.startswith("blank image") and predictions[1].warning == ""


@pytest.mark.parametrize("scale", [255.0, 4.0])
def test_the_engine_refuses_input_that_was_not_normalised(dropout_run, scale):
    """Raw pixel values reach no model: 0..255 floats, or anything outside the normalised range."""
    clf = Classifier.load(dropout_run, device="cpu", mc_samples=2)
    raw = np.random.default_rng(0).random((1, 3, 160, 160), dtype=np.float32) * scale
    with pytest.raises(CxrError, match="outside the normalised range"):
        clf.engine.logits(raw)
    with pytest.raises(CxrError, match="outside the normalised range"):
        clf.engine.sample_logits(raw, 2, seed=0)


def test_model_card_names_the_training_data_and_its_limits(dropout_run):
    card = Classifier.load(dropout_run, device="cpu").card()
    assert card["architecture"] == "test_efficientnet" and card["labels"] == list(LABELS)
    splits = card["training_data"]["splits"]
    assert set(splits) == {"train", "val", "test"} and splits["train"]["images"] > 0
    assert "not a medical device" in card["limits"].lower()
    json.dumps(card)


def test_unknown_engine_is_a_user_error(dropout_run):
    with pytest.raises(CxrError, match="--engine"):
        Classifier.load(dropout_run, engine="tensorrt")
