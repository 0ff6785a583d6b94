"""Specifications of the ONNX export: parity with PyTorch on real radiographs for every model
family, MC dropout on ONNX Runtime sampling PyTorch's distribution, and nothing written when the
check fails."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from scipy.special import expit
from torch import nn

from cxrfusion import Classifier
from cxrfusion.cli import main
from cxrfusion.data.dataset import split_datasets
from cxrfusion.data.imageio import read_resized
from cxrfusion.data.transforms import normalize
from cxrfusion.errors import CxrError
from cxrfusion.inference import onnx_engine, quantize
from cxrfusion.inference.export import export_model, export_run, parity_images
from cxrfusion.inference.onnx_engine import OnnxEngine
from cxrfusion.inference.runs import load_run
from cxrfusion.labels import LABELS
from cxrfusion.models import create_model
from cxrfusion.models.base import CxrModel
from cxrfusion.models.mc_dropout import mc_dropout_samples
from cxrfusion.stats.temperature import write_temperature
from cxrfusion.training.config import TrainConfig

SIZE = 64  # small input: export time, not resolution, is what these tests pay for
TOLERANCE = 1e-4


def radiographs(nih_sample: Path, count: int, start: int = 0, model: CxrModel | None = None):
    """`count` real NIH images, resized to SIZE and normalised for `model` (default ImageNet's
    statistics): (count, 3, SIZE, SIZE)."""
    files = sorted((nih_sample / "images").glob("*.png"))[start : start + count]
    images = torch.from_numpy(np.stack([read_resized(path, SIZE) for path in files]))[:, None]
    return normalize(images) if model is None else normalize(images, model.mean, model.std)


def reference_head(head: nn.Sequential, features: torch.Tensor, masks: list[np.ndarray]):
    """The head computed by hand: each nn.Dropout replaced by multiplication with its mask."""
    remaining = iter(masks)
    x = features
    for module in head:
        x = x * torch.from_numpy(next(remaining)) if isinstance(module, nn.Dropout) else module(x)
    return x


@pytest.mark.parametrize(
    "name", ["simple_cnn", "densenet121", "efficientnet_b0", "test_efficientnet", "fusion"]
)
def test_onnx_runtime_matches_pytorch_on_real_radiographs(name, nih_sample, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, weights="none").eval()
    report = export_model(
        model,
        tmp_path / "export",
        {"labels": list(LABELS)},
        radiographs(nih_sample, 2, model=model),
    )
    assert max(report.max_abs_diff.values()) <= TOLERANCE

    engine = OnnxEngine(tmp_path / "export")
    x = radiographs(
        nih_sample, 3, start=10, model=model
    )  # other images, another batch size than the check
    with torch.no_grad():
        features = model.features(x)
        expected = model(x).numpy()
    assert np.abs(engine.logits(x.numpy()) - expected).max() <= TOLERANCE

    masks = onnx_engine.draw_masks(engine.layers, len(x), np.random.default_rng(1))
    with torch.no_grad():
        masked = reference_head(model.head, features, masks).numpy()
    assert np.abs(engine.head(features.numpy(), masks) - masked).max() <= TOLERANCE
    dropouts = [m for m in model.head.modules() if isinstance(m, nn.Dropout)]
    assert [layer.p for layer in engine.layers] == [m.p for m in dropouts]


def moments_agree(a: np.ndarray, b: np.ndarray, sigmas: float = 5.0) -> bool:
    """Whether two independent sample sets (T, B, C) have the same per-(image, class) mean and
    standard deviation, within `sigmas` standard errors (delta method for the std)."""
    t = len(a)

    def mean_and_std_variances(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = s - s.mean(axis=0)
        m2, m4 = (centred**2).mean(axis=0), (centred**4).mean(axis=0)
        return m2 / t, (m4 - m2**2) / (4 * t * np.maximum(m2, 1e-12))

    (var_mean_a, var_std_a), (var_mean_b, var_std_b) = map(mean_and_std_variances, (a, b))
    mean_ok = np.abs(a.mean(0) - b.mean(0)) <= sigmas * np.sqrt(var_mean_a + var_mean_b) + 1e-6
    std_ok = np.abs(a.std(0) - b.std(0)) <= sigmas * np.sqrt(var_std_a + var_std_b) + 1e-6
    return bool(mean_ok.all() and std_ok.all())


@pytest.fixture(scope="module")
def exported_run(mc_dropout_run, tmp_path_factory) -> tuple[Path, Path, str]:
    """A copy of the trained run with saved temperatures and an evaluation threshold, exported
    through the CLI: (run, export folder, what the CLI printed)."""
    run = tmp_path_factory.mktemp("run") / "mc_dropout"
    run.mkdir()
    for name in ("config.yaml", "best.ckpt", "split.csv"):
        shutil.copy(mc_dropout_run / name, run / name)
    write_temperature(run, np.full(len(LABELS), 1.5), fitted_on={"split": "val"})
    (run / "eval_test").mkdir()
    (run / "eval_test" / "metrics.json").write_text(json.dumps({"uncertainty": {"threshold": 0.2}}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "--run", str(run), "--out", str(run / "onnx")]) == 0
    return run, run / "onnx", out.getvalue()


def test_cli_export_writes_model_json_with_what_inference_needs(exported_run):
    run, folder, printed = exported_run
    assert "max abs difference" in printed
    assert sorted(p.name for p in folder.iterdir()) == ["features.onnx", "head.onnx", "model.json"]
    card = json.loads((folder / "model.json").read_text())
    assert card["labels"] == list(LABELS)
    assert (card["input_size"], card["cache_size"], card["model"]) == (64, 64, "test_efficientnet")
    model = load_run(run)[0]
    assert card["normalization"] == {"mean": list(model.mean), "std": list(model.std)}
    assert card["threshold"] == 0.2
    assert card["temperatures"] == dict.fromkeys(LABELS, 1.5)
    assert [(d["p"], d["width"]) for d in card["dropout"]] == [(0.4, 256), (0.4, 512)]
    assert set(card["versions"]) == {"torch", "onnx", "onnxruntime", "cxrfusion"}
    assert card["opset"] == 17
    assert max(card["parity"]["max_abs_diff"].values()) <= TOLERANCE
    assert card["parity"]["source"].startswith("4 validation images of ")


def test_a_checkpoint_exports_with_the_settings_of_its_run(exported_run, tmp_path):
    run, _, _ = exported_run
    metadata = export_run(run / "best.ckpt", tmp_path / "export").metadata
    assert metadata["threshold"] == 0.2 and metadata["temperatures"] == dict.fromkeys(LABELS, 1.5)
    assert metadata["parity"]["source"].startswith("4 validation images of ")


def test_an_export_without_its_normalisation_says_to_export_again(exported_run, tmp_path):
    _, folder, _ = exported_run
    old = shutil.copytree(folder, tmp_path / "old")
    metadata = json.loads((old / "model.json").read_text())
    del metadata["normalization"]
    (old / "model.json").write_text(json.dumps(metadata))
    with pytest.raises(CxrError, match="no normalization .* export the run again"):
        OnnxEngine(old)


def test_onnx_mc_dropout_samples_the_distribution_of_the_pytorch_fast_path(
    exported_run, nih_sample, monkeypatch
):
    """T = 400 draws each, 4 images x 14 classes: per-class means and stds must agree within 5
    standard errors (the largest of 112 comparisons of truly equal distributions is ~3.5 SE)."""
    run, folder, _ = exported_run
    model = load_run(run)[0]
    x = radiographs(nih_sample, 4, model=model)
    torch_samples = mc_dropout_samples(model, x, 400, mode="head", seed=0).numpy()
    engine = OnnxEngine(folder)

    def onnx_samples() -> np.ndarray:
        return expit(engine.sample_logits(x.numpy(), 400, seed=0))

    assert torch_samples.std(axis=0).mean() > 1e-3  # the trained head really is random
    assert moments_agree(onnx_samples(), torch_samples)

    # The same comparison catches a plausible sampler bug: masks not rescaled by 1 / (1 - p).
    draw = onnx_engine.draw_masks
    unscaled = lambda layers, rows, rng: [  # noqa: E731
        m * (1 - layer.p) for m, layer in zip(draw(layers, rows, rng), layers, strict=True)
    ]
    monkeypatch.setattr(onnx_engine, "draw_masks", unscaled)
    assert not moments_agree(onnx_samples(), torch_samples)


def test_onnx_samples_each_image_under_its_own_seed_exactly_as_it_samples_it_alone(
    exported_run, nih_sample, monkeypatch
):
    run, folder, _ = exported_run
    x = radiographs(nih_sample, 4, model=load_run(run)[0]).numpy()
    engine = OnnxEngine(folder)
    features = engine.features  # image by image: features that cannot depend on the batch
    monkeypatch.setattr(
        engine,
        "features",
        lambda x: np.concatenate([features(x[i : i + 1]) for i in range(len(x))]),
    )
    seeds = [3, 3, 7, 0]
    together = engine.sample_logits_each(x, 6, seeds)
    for b, seed in enumerate(seeds):
        np.testing.assert_array_equal(
            together[:, b], engine.sample_logits(x[b : b + 1], 6, seed)[:, 0]
        )
    # One generator for the whole batch gives the first image other masks.
    assert not np.array_equal(together[:, 0], engine.sample_logits(x, 6, 3)[:, 0])


def test_onnx_engine_finds_the_export_of_a_run_and_says_how_to_make_a_missing_one(
    exported_run, tmp_path
):
    run, folder, _ = exported_run
    shutil.copytree(folder, run / "export")
    assert OnnxEngine(run).folder == run / "export"
    with pytest.raises(CxrError, match=r"run `cxrfusion export --run .*` first"):
        OnnxEngine(tmp_path)


def test_classifier_on_the_onnx_engine_has_the_run_spec_and_the_run_logits(
    exported_run, nih_sample
):
    run, folder, _ = exported_run
    by_torch = Classifier.load(run, device="cpu")
    by_onnx = Classifier.load(folder, engine="onnx")
    assert by_onnx.card() == by_torch.card()  # labels, sizes, normalisation, threshold, ...
    image = next((nih_sample / "images").glob("*.png"))
    x = by_torch.model_input(by_torch.prepare(image).image[None])
    assert np.abs(by_onnx.engine.logits(x) - by_torch.engine.logits(x)).max() <= TOLERANCE
    prediction = by_onnx.predict(image)
    assert prediction.probability.shape == (14,) and prediction.std.max() > 0
    with pytest.raises(CxrError, match="outside the normalised range"):
        by_onnx.engine.sample_logits(x * 0 + 255.0, 2, seed=0)


def test_classifier_on_the_onnx_engine_says_how_to_export_a_run_without_export(mc_dropout_run):
    with pytest.raises(CxrError, match=r"run `cxrfusion export --run .*mc_dropout` first"):
        Classifier.load(mc_dropout_run, engine="onnx")


class _TraceFrozen(nn.Module):
    """Features that freeze a data-dependent number into a traced graph (a classic export bug)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * float(x.std())


class _TraceFrozenModel(CxrModel):
    def __init__(self) -> None:
        super().__init__(_TraceFrozen(), nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 14)), 3)

    def gradcam_target_layers(self) -> list[nn.Module]:
        return []


def test_failed_parity_check_raises_and_writes_no_export_folder(nih_sample, tmp_path):
    with pytest.raises(CxrError, match="differs from PyTorch"):
        export_model(_TraceFrozenModel(), tmp_path / "export", {}, radiographs(nih_sample, 2))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_export_replaces_a_previous_export_but_refuses_another_folder(nih_sample, tmp_path):
    model, x = create_model("simple_cnn", weights="none"), radiographs(nih_sample, 2)
    export_model(model, tmp_path / "export", {"run": "first"}, x)
    export_model(model, tmp_path / "export", {"run": "second"}, x)
    assert json.loads((tmp_path / "export" / "model.json").read_text())["run"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(CxrError, match="holds no export"):
        export_model(model, tmp_path / "notes", {}, x)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_a_run_is_checked_on_its_validation_images_or_else_on_phantoms(mc_dropout_run, tmp_path):
    config = TrainConfig.from_yaml(mc_dropout_run / "config.yaml")
    images, source = parity_images(mc_dropout_run, config)
    val = split_datasets(
        Path(config.prepared), SIZE, SIZE, split_file=mc_dropout_run / "split.csv"
    )["val"]
    expected = np.stack([val[i][0][0].numpy() for i in range(4)])
    assert np.array_equal(images, expected) and source.startswith("4 validation images")

    few = tmp_path / "few"  # a run whose validation split holds 2 images: topped up
    few.mkdir()
    split = pd.read_csv(mc_dropout_run / "split.csv")
    val_rows = split.index[split["split"] == "val"]
    split.drop(val_rows[2:]).to_csv(few / "split.csv", index=False)
    images, source = parity_images(few, config)
    np.testing.assert_array_equal(images[:2], expected[:2])
    assert source.endswith("and 2 built-in phantom radiographs") and len(images) == 4

    elsewhere = dataclasses.replace(config, prepared=str(tmp_path / "moved"))
    images, source = parity_images(mc_dropout_run, elsewhere)
    assert source == "4 built-in phantom radiographs"
    assert images.shape == (4, SIZE, SIZE) and images.dtype == np.uint8
    assert len({image.tobytes() for image in images}) == 4  # four different chests


TORCHLESS = """
import importlib.abc, json, sys

BLOCKED = {"torch", "torchvision", "lightning", "timm"}


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the ONNX path must run without it")


sys.meta_path.insert(0, NoTorch())
import httpx

from cxrfusion import Classifier
from cxrfusion.cli import main
from cxrfusion.serving import ServeSettings, create_app
from cxrfusion.serving.server import background_server

export, image, out = sys.argv[1:]
api = Classifier.load(export, engine="onnx").predict(image).probability.tolist()
status = main(["predict", "--run", export, image, "--engine", "onnx", "--out", out])
app = create_app(Classifier.load(export, engine="onnx"), ServeSettings())
with background_server(app) as url, open(image, "rb") as file:
    response = httpx.post(f"{url}/predict", files={"file": ("x.png", file, "image/png")})
    heatmaps = httpx.get(f"{url}/health").json()["heatmaps"]
served = [p["probability"] for p in response.json()["pathologies"]]
loaded = [m for m in sys.modules if m.partition(".")[0] in BLOCKED]
print(json.dumps({"api": api, "cli": status, "served": served, "heatmaps": heatmaps, "loaded": loaded}))
"""


def test_the_api_predict_and_serve_run_on_an_export_with_torch_unimportable(
    exported_run, nih_sample, tmp_path
):
    """`--engine onnx` imports no torch: torch, torchvision, timm and lightning are blocked in a
    fresh interpreter, and its numbers are those of the ONNX engine with torch at hand."""
    _, folder, _ = exported_run
    image = next((nih_sample / "images").glob("*.png"))
    done = subprocess.run(
        [sys.executable, "-c", TORCHLESS, str(folder), str(image), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["cli"] == 0 and result["loaded"] == []
    assert result["heatmaps"] is False  # the ONNX engine has no Grad-CAM: the server says so
    expected = Classifier.load(folder, engine="onnx").predict(image).probability
    np.testing.assert_allclose(result["api"], expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(result["served"], expected, rtol=0, atol=1e-7)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    np.testing.assert_allclose(table[list(LABELS)].to_numpy()[0], expected, rtol=0, atol=1e-6)


def test_cli_export_of_a_folder_without_a_run_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "x").exists()


def test_export_refuses_an_opset_the_exporter_cannot_write(tmp_path):
    model, x = create_model("simple_cnn", weights="none"), torch.zeros(2, 3, SIZE, SIZE)
    with pytest.raises(CxrError, match="--opset 12"):
        export_model(model, tmp_path / "export", {}, x, opset=12)
    assert not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def int8_export(exported_run) -> tuple[Path, str]:
    """The trained run exported with `--quantize int8` through the CLI: (folder, what it printed)."""
    run, _, _ = exported_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(["export", "--run", str(run), "--out", str(run / "int8"), "--quantize", "int8"])
            == 0
        )
    return run / "int8", out.getvalue()


def test_onnx_runtimes_quantiser_warnings_stay_out_of_the_users_way(exported_run, tmp_path):
    """It warns on the root logger about each BatchNorm weight; a user sees them with -v only."""
    _, folder, _ = exported_run
    seen: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = seen.append
    root = logging.getLogger()
    root.addHandler(collect)
    level = root.level
    try:
        images = np.random.default_rng(0).normal(size=(4, 3, SIZE, SIZE)).astype(np.float32)
        for verbose in (False, True):  # the CLI's root level without and with -v
            root.setLevel(logging.INFO if verbose else logging.WARNING)
            quantize.quantize_graph(folder / "features.onnx", tmp_path / "int8.onnx", images)
            warned = [r for r in seen if r.name == "root" and r.levelno == logging.WARNING]
            assert bool(warned) == verbose, [r.getMessage() for r in warned][:3]
    finally:
        root.setLevel(level)
        root.removeHandler(collect)


def test_int8_export_writes_a_quantised_features_graph_and_records_its_check(int8_export):
    folder, printed = int8_export
    assert "INT8 vs FP32 on" in printed and "largest probability difference" in printed
    assert sorted(p.name for p in folder.iterdir()) == [
        "features.int8.onnx",
        "head.onnx",
        "model.json",
    ]
    metadata = json.loads((folder / "model.json").read_text())
    assert metadata["files"]["features"] == "features.int8.onnx"
    entry = metadata["quantization"]
    assert entry["type"] == "int8" and entry["passed"] and not entry["forced"]
    check = entry["check"]
    assert check["source"].startswith("validation images of ") and check["images"] > 100
    assert check["auc_difference"] <= check["tolerance"] == quantize.AUC_TOLERANCE
    assert 0 < check["max_probability_difference"] < 0.2
    assert entry["bytes"]["int8"] < entry["bytes"]["fp32"] / 2
    graph = onnx.load(folder / "features.int8.onnx")
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 10  # the convolutions' weights are stored as int8


def test_classifier_on_an_int8_export_stays_within_the_checked_difference(
    exported_run, int8_export
):
    run, fp32_folder, _ = exported_run
    folder, _ = int8_export
    int8 = Classifier.load(folder, engine="onnx")
    fp32 = Classifier.load(fp32_folder, engine="onnx")
    checked = int8.card()["quantization"]["check"]
    data = quantize.check_images(run, TrainConfig.from_yaml(run / "config.yaml"))
    x = int8.model_input(data.images)
    difference = np.abs(expit(int8.engine.logits(x)) - expit(fp32.engine.logits(x))).max()
    assert 0 < difference <= checked["max_probability_difference"] + 1e-6
    assert "quantization" not in fp32.card()
    prediction = int8.predict(next(iter(data.images)))
    assert prediction.std.max() > 0  # the FP32 head still samples MC dropout


def test_an_int8_graph_beyond_the_auc_tolerance_is_refused_unless_forced(
    exported_run, tmp_path, monkeypatch
):
    """A negative tolerance fails every check, whatever the AUC difference is."""
    run, _, _ = exported_run
    monkeypatch.setattr(quantize, "AUC_TOLERANCE", -1.0)
    with pytest.raises(CxrError, match="beyond the tolerance; nothing was written"):
        export_run(run, tmp_path / "export", quantize="int8")
    assert list(tmp_path.iterdir()) == []

    entry = export_run(run, tmp_path / "export", quantize="int8", force=True).metadata
    written = json.loads((tmp_path / "export" / "model.json").read_text())["quantization"]
    assert written == entry["quantization"]
    assert written["forced"] and not written["passed"] and written["check"]["tolerance"] == -1.0
    assert written["check"]["auc_difference"] >= 0
    assert Classifier.load(tmp_path / "export", engine="onnx").card()["quantization"]["forced"]


def test_int8_is_checked_on_labelled_phantoms_when_the_cache_is_away(mc_dropout_run, tmp_path):
    config = TrainConfig.from_yaml(mc_dropout_run / "config.yaml")
    elsewhere = dataclasses.replace(config, prepared=str(tmp_path / "moved"))
    data = quantize.check_images(mc_dropout_run, elsewhere, phantoms=40)
    assert data.source == "built-in phantom radiographs"
    assert data.images.shape == (40, SIZE, SIZE) and data.images.dtype == np.uint8
    assert data.labels.shape == (40, len(LABELS))
    assert (data.labels.sum(axis=0) > 0).all() and (data.labels.sum(axis=0) < 40).all()
