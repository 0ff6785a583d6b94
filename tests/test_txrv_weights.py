"""TorchXRayVision's chest-X-ray DenseNet121 weights in our densenet121 and fusion backbones.

TXRV's architecture is built with random weights (no download here) and saved locally; our weights
path must then give its exact features from our own input pipeline (ImageNet-normalised 3 channels)
as TXRV gives from its own ([-1024, 1024], one channel). Skips where the [txrv] extra is absent.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import timm
import timm.models._builder
import torch
import yaml
from torch.nn.backends.thnn import _get_thnn_function_backend

from cxrfusion.data.transforms import normalize
from cxrfusion.errors import CxrError
from cxrfusion.inference.runs import load_run
from cxrfusion.models import create_model
from cxrfusion.models.txrv import WEIGHT_SETS
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.fit import train


@pytest.fixture(scope="module")
def xrv() -> ModuleType:
    return pytest.importorskip(
        "torchxrayvision", reason="optional extra [txrv] absent: pip install 'cxrfusion[txrv]'"
    )


@pytest.fixture(scope="module")
def txrv_net(xrv: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """TXRV's DenseNet with random weights AND random BatchNorm statistics (defaults would hide a
    dropped running mean), saved as a state dict: (model in eval mode, file)."""
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.2, generator=generator)
    path = tmp_path_factory.mktemp("txrv") / "txrv_densenet.pth"
    torch.save(net.state_dict(), path)
    return net, path


def _images(size: int, count: int = 1) -> np.ndarray:
    """uint8 radiograph stand-ins using the whole 0..255 range, dark borders included."""
    return np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)


def _theirs(xrv: ModuleType, net: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    """TXRV's features: their own normalisation of the same uint8 images, then features2."""
    x = torch.from_numpy(np.stack([xrv.utils.normalize(i, 255) for i in images]))[:, None]
    with torch.no_grad():
        return net.features2(x)


def _ours(images: np.ndarray) -> torch.Tensor:
    return normalize(torch.from_numpy(images)[:, None])


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def test_densenet121_from_txrv_weights_gives_txrvs_own_features(xrv, txrv_net) -> None:
    net, path = txrv_net
    model = create_model("densenet121", weights=f"torchxrayvision:{path}").eval()
    images = _images(224)
    with torch.no_grad():
        ours = model.features(_ours(images))
    _assert_same(ours, _theirs(xrv, net, images))


def test_fusions_densenet_branch_gets_the_txrv_weights(xrv, txrv_net, monkeypatch) -> None:
    """The EfficientNet branch takes ImageNet weights; here timm's download is a no-op."""
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: None)
    net, path = txrv_net
    model = create_model("fusion", weights=f"torchxrayvision:{path}").eval()
    images = _images(224)
    with torch.no_grad():
        branch = model.backbones()["densenet121"]
        maps = branch.forward_intermediates(_ours(images), indices=[4], intermediates_only=True)
        theirs = torch.relu(
            net.features(torch.from_numpy(xrv.utils.normalize(images, 255))[:, None])
        )
    _assert_same(maps[0], theirs)


def _tiny_prepared(prepared: Path, out: Path, per_split: int = 16) -> Path:
    """The first images of each split of `prepared`, sharing its cache: a seconds-long epoch."""
    out.mkdir()
    split = pd.read_csv(prepared / "split.csv")
    split.groupby("split").head(per_split).to_csv(out / "split.csv", index=False)
    for cache_file in prepared.glob("images_*"):
        (out / cache_file.name).symlink_to(cache_file)
    return out


def test_trained_run_records_the_mapping_and_reloads_txrvs_features(
    xrv, txrv_net, prepared: Path, tmp_path: Path
) -> None:
    """One phase-1 epoch (backbone frozen) keeps the backbone; the checkpoint, reloaded without
    any weights source, must still compute TXRV's features: the fold needs no extra layer."""
    net, path = txrv_net
    config = TrainConfig(
        prepared=str(_tiny_prepared(prepared, tmp_path / "prepared")),
        out=str(tmp_path / "run"),
        model="densenet121",
        weights=f"torchxrayvision:{path}",
        epochs=1,
        phase1_epochs=1,
        cache_size=64,
        input_size=64,
        batch_size=16,
        workers=0,
    )
    run = train(config)
    text = (run / "config.yaml").read_text()
    assert f"TorchXRayVision state dict {path}" in text and "input mapping" in text
    assert yaml.safe_load(text)["weights"] == f"torchxrayvision:{path}"
    model, _ = load_run(run)
    images = _images(64, count=4)
    with torch.no_grad():
        ours = model.features(_ours(images))
    _assert_same(ours, _theirs(xrv, net, images))


def test_named_weight_set_without_internet_names_the_offline_alternatives(
    xrv, monkeypatch, tmp_path: Path
) -> None:
    import requests  # a dependency of torchxrayvision

    def no_network(url: str, filename: str) -> None:
        raise requests.ConnectionError(f"Failed to resolve host for {url}")

    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(xrv.utils, "download", no_network)
    with pytest.raises(CxrError, match="cannot download TorchXRayVision") as raised:
        create_model("densenet121", weights="torchxrayvision:densenet121-res224-nih")
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt") in message
    assert "--weights torchxrayvision:/path/to/txrv.pth" in message
    assert not list(tmp_path.glob("*.pt")), "no file may look like downloaded weights"


def _cache_file(xrv: ModuleType, tmp_path: Path, monkeypatch, name: str) -> Path:
    """Where TXRV looks for weight set `name`, in a cache at `tmp_path`; nothing is downloaded."""

    def no_download(url: str, filename: str) -> None:
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(xrv.utils, "get_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(xrv.utils, "download", no_download)
    return tmp_path / Path(xrv.models.model_urls[name]["weights_url"]).name


class _OldBackend:
    """Pickles as torch <= 1.4 pickled every module's `_backend` attribute."""

    def __reduce__(self) -> tuple:
        return (_get_thnn_function_backend, ())


@pytest.mark.filterwarnings("error::torch.serialization.SourceChangeWarning")
@pytest.mark.parametrize("legacy", [True, False], ids=["torch<1.6 format", "zip format"])
def test_a_published_pickled_densenet_gives_txrvs_own_features(
    xrv, txrv_net, tmp_path, monkeypatch, legacy
) -> None:
    """TXRV publishes whole pickled models (from 2019-20: the legacy format, `_backend`s)."""
    net, _ = txrv_net
    published = copy.deepcopy(net)
    for module in published.modules():
        module._backend = _OldBackend()
    path = _cache_file(xrv, tmp_path, monkeypatch, "densenet121-res224-nih")
    torch.save(published, path, _use_new_zipfile_serialization=not legacy)
    model = create_model("densenet121", weights="torchxrayvision:densenet121-res224-nih").eval()
    images = _images(224)
    with torch.no_grad():
        ours = model.features(_ours(images))
    _assert_same(ours, _theirs(xrv, net, images))


class _RunsCode:
    """A pickle payload: unpickling it creates the folder `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


class _CallsTxrvsLoader:
    """A pickle payload that needs no foreign code: TXRV's own DenseNet(weights=...), which
    unpickles another cached file unrestricted."""

    def __init__(self, xrv: ModuleType, name: str) -> None:
        self.xrv, self.name = xrv, name

    def __reduce__(self) -> tuple:
        return (self.xrv.models.DenseNet, (32, (6, 12, 24, 16), 64, 4, 0, 18, 1, self.name))


@pytest.mark.parametrize("payload", ["runs a function", "calls TXRV's loader"])
def test_a_pickle_planted_in_txrvs_cache_is_refused_and_runs_nothing(
    xrv, tmp_path, monkeypatch, payload
) -> None:
    marker = tmp_path / "ran"
    net = xrv.models.DenseNet(weights=None)
    net.payload = _RunsCode(marker)
    if payload == "calls TXRV's loader":
        torch.save(net, _cache_file(xrv, tmp_path, monkeypatch, "densenet121-res224-pc"))
        net.payload = _CallsTxrvsLoader(xrv, "densenet121-res224-pc")
    path = _cache_file(xrv, tmp_path, monkeypatch, "densenet121-res224-nih")
    torch.save(net, path)
    with pytest.raises(CxrError, match="delete it to download it again") as raised:
        create_model("densenet121", weights="torchxrayvision:densenet121-res224-nih")
    assert str(raised.value).startswith(f"{path}: not TorchXRayVision's")
    assert "\n" not in str(raised.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", ["state dict", "garbage"])
def test_anything_else_in_txrvs_cache_is_a_one_line_error(
    xrv, tmp_path, monkeypatch, content
) -> None:
    path = _cache_file(xrv, tmp_path, monkeypatch, "densenet121-res224-nih")
    if content == "state dict":
        torch.save(xrv.models.DenseNet(weights=None).state_dict(), path)
    else:
        path.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(
        CxrError, match=f"^{re.escape(str(path))}: not TorchXRayVision's .*weights"
    ) as raised:
        create_model("densenet121", weights="torchxrayvision:densenet121-res224-nih")
    assert "\n" not in str(raised.value)


def test_every_txrv_weight_set_is_a_densenet121_of_txrvs_table(xrv) -> None:
    for name in WEIGHT_SETS:
        assert xrv.models.model_urls[name]["input_resolution"] == 224
        assert "densenet121" in xrv.models.model_urls[name]["weights_url"]


def test_txrv_weights_refuse_a_model_without_densenet121(txrv_net) -> None:
    _, path = txrv_net
    with pytest.raises(CxrError, match="fit a densenet121 backbone; .* has efficientnet_b0"):
        create_model("efficientnet_b0", weights=f"torchxrayvision:{path}")


def test_a_timm_state_dict_is_not_taken_for_txrv_weights(tmp_path: Path) -> None:
    path = tmp_path / "timm_densenet.pth"
    torch.save(timm.create_model("densenet121", num_classes=0).state_dict(), path)
    with pytest.raises(CxrError, match=r"not a TorchXRayVision DenseNet121 .*is \(64, 3, 7, 7\)"):
        create_model("densenet121", weights=f"torchxrayvision:{path}")


def test_unknown_txrv_name_lists_the_weight_sets() -> None:
    with pytest.raises(CxrError, match="densenet121-res224-all, densenet121-res224-nih"):
        create_model("densenet121", weights="torchxrayvision:densenet121-res224-imagenet")
