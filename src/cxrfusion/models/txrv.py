"""TorchXRayVision's chest-X-ray DenseNet121 weights as the state dict of a timm `densenet121`.

`--weights torchxrayvision:densenet121-res224-all` (or another of `WEIGHT_SETS`) loads the weights
TorchXRayVision (TXRV, Cohen et al. 2022) trained on chest radiographs; `torchxrayvision:FILE`
reads a TXRV DenseNet state dict from a local file instead (machines without internet). Neither
runs code from the file: TXRV's published files (pickled models) are read by a restricted
unpickler, never by TXRV's own loader, and a state dict with `weights_only=True`.

Input mapping. TXRV's DenseNet reads ONE channel t = (2 u / 255 - 1) * 1024 for a uint8 pixel u
(`xrv.utils.normalize(img, 255)`, range [-1024, 1024]) at 224 px; its `features2` is
relu(features(t)) average-pooled, which is exactly what timm's densenet121 computes (timm's `norm5`
holds the ReLU), and its `op_threshs` touch only its own classifier, which is dropped. Our input is
3 identical channels x_c = (u / 255 - mean_c) / std_c (ImageNet normalisation). With weights a_c
such that sum(a) = 1 and sum(a * mean) = 0.5, sum_c 2048 a_c std_c x_c = t for every pixel, and
x = 0 (conv0's zero padding) maps to t = 0 (TXRV's zero padding). So folding k_c = 2048 a_c std_c
into conv0 (`weight[:, c] = W_txrv * k_c`, no bias) makes the backbone compute TXRV's own features
from our input, borders included, with no extra layer: a checkpoint reloads as a plain densenet121.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

import torch
from torch.nn.backends.thnn import _get_thnn_function_backend
from torch.serialization import SourceChangeWarning

from cxrfusion.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cxrfusion.errors import CxrError

PREFIX = "torchxrayvision:"
BACKBONE = "densenet121"
WEIGHT_SETS = tuple(
    f"densenet121-res224-{name}"
    for name in ("all", "nih", "pc", "chex", "rsna", "mimic_nb", "mimic_ch")
)
TXRV_RANGE = 1024.0  # t = (2 u / 255 - 1) * TXRV_RANGE
_CONV0 = "features.conv0.weight"


def is_txrv(weights: str | Path) -> bool:
    """Whether a --weights value names TorchXRayVision weights."""
    return str(weights).startswith(PREFIX)


def input_fold() -> torch.Tensor:
    """k (3,), float64: conv0's single TXRV input channel becomes k_c times it on our channel c.

    a is the minimum-norm solution of sum(a) = 1, sum(a * mean) = 0.5 (module docstring); the three
    ImageNet means differ, so it exists.
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)
    constraints = torch.stack([torch.ones(3, dtype=torch.float64), mean])
    a = torch.linalg.pinv(constraints) @ torch.tensor([1.0, 0.5], dtype=torch.float64)
    return 2 * TXRV_RANGE * a * std


def to_timm(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A TXRV DenseNet121 state dict under timm's densenet121 names, conv0 folded to 3 channels.

    TXRV's names are torchvision's, which timm's densenet121 shares (`features.conv0`,
    `features.denseblockN.denselayerM.norm1`, `features.transitionN`, `features.norm5`); its
    `classifier` and `op_threshs` are dropped.
    """
    conv0 = state_dict.get(_CONV0)
    if not isinstance(conv0, torch.Tensor) or conv0.shape[1:] != (1, 7, 7):
        found = "missing" if conv0 is None else tuple(getattr(conv0, "shape", ()))
        raise CxrError(
            f"{source}: not a TorchXRayVision DenseNet121 state dict "
            f"({_CONV0} should be (64, 1, 7, 7), is {found})"
        )
    mapped = {k: v for k, v in state_dict.items() if k.startswith("features.")}
    k = input_fold().view(1, 3, 1, 1)
    mapped[_CONV0] = (conv0.double() * k).to(conv0.dtype)
    return mapped


def load_txrv(weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """(timm densenet121 state dict, source description) for `torchxrayvision:NAME|FILE`."""
    name = str(weights)[len(PREFIX) :]
    if name in WEIGHT_SETS:
        return to_timm(_read_published(name), f"{PREFIX}{name}"), _published(name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise CxrError(
            f"--weights {weights}: neither a TorchXRayVision weight set "
            f"({', '.join(WEIGHT_SETS)}) nor an existing file"
        )
    return to_timm(_read_state_dict(path), str(path)), f"TorchXRayVision state dict {path}"


def describe(weights: str) -> str:
    """What a run's config.yaml says about these weights and the input mapping (YAML comments)."""
    name = str(weights)[len(PREFIX) :]
    source = _published(name) if name in WEIGHT_SETS else f"TorchXRayVision state dict {name}"
    k = ", ".join(f"{v:.2f}" for v in input_fold().tolist())
    return (
        f"# weights: {source}, in the {BACKBONE} backbone (any other backbone: ImageNet)\n"
        "# input mapping: TXRV reads 1 channel t = (2 u/255 - 1) * 1024 at 224 px; folded into "
        f"features.conv0 (weight[:, c] = W_txrv * k_c, k = ({k})),\n"
        "#   so the ImageNet-normalised 3-channel input gives TXRV's own features, borders included\n"
    )


def _published(name: str) -> str:
    return f"TorchXRayVision {name} ({_url(name)})"


def _xrv(name: str) -> ModuleType:
    """torchxrayvision, imported so that its `warnings.filterwarnings("ignore")` does not stay."""
    try:
        with warnings.catch_warnings():
            import torchxrayvision
    except ImportError:
        raise CxrError(
            f"--weights {PREFIX}{name}: needs the optional package torchxrayvision "
            "(pip install 'cxrfusion[txrv]')"
        ) from None
    return torchxrayvision


def _url(name: str) -> str:
    return _xrv(name).models.model_urls[name]["weights_url"]


def _cache_file(name: str) -> str:
    """Where torchxrayvision looks for (and downloads) the published file of a weight set."""
    return os.path.join(_xrv(name).utils.get_cache_dir(), os.path.basename(_url(name)))


def _offline_help(name: str) -> str:
    return (
        f"without internet, copy {_url(name)} to {_cache_file(name)}, or save its state dict "
        'on a machine that has it: python -c "import torch, torchxrayvision as xrv; '
        f"torch.save(xrv.models.DenseNet(weights='{name}').state_dict(), 'txrv.pth')\" "
        "and pass --weights torchxrayvision:/path/to/txrv.pth"
    )


def _download(name: str) -> Path:
    """The published file of a weight set, which TXRV downloads into its cache once."""
    try:
        return Path(_xrv(name).models.get_weights(name))
    except OSError as exc:  # requests' errors are OSErrors: no network, DNS, HTTP status
        cause = _first_line(exc)[:120]
        raise CxrError(
            f"--weights {PREFIX}{name}: cannot download TorchXRayVision's weights ({cause}); "
            + _offline_help(name)
        ) from exc


def _read_published(name: str) -> Mapping[str, torch.Tensor]:
    """The state dict of a published file (a whole pickled DenseNet), read running none of its code.

    TXRV's own loader unpickles it with `weights_only=False`, so a file planted in its cache ran
    code. `weights_only=True` cannot rebuild a pickled model (in the pre-1.6 format these 2020
    files likely use, not even with allowlisted classes), and TXRV publishes no checksums to pin.
    So `_Unpickler` resolves only the names such a file holds, every module class as `_Inert`.
    """
    path = _download(name)
    try:
        with warnings.catch_warnings():
            # the legacy format records each module's source, which never matches `_Inert`'s
            warnings.simplefilter("ignore", SourceChangeWarning)
            model = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_Pickle)
        if not isinstance(model, _Inert):
            raise TypeError(f"holds a {type(model).__name__}, not a pickled DenseNet")
        return model.state_dict()
    except _UNREADABLE as exc:
        raise CxrError(
            f"{path}: not TorchXRayVision's {name} weights ({_first_line(exc)}); "
            "delete it to download it again"
        ) from None


class _Inert(torch.nn.Module):
    """Stands in for every module class of a published file: holds its tensors and runs none of
    its code (TXRV's `DenseNet(weights=...)`, called by a crafted pickle, would load another file
    unrestricted)."""


# The globals a published DenseNet file names (module classes as torch <= 1.4 recorded them),
# none of which runs code from the file; each module class becomes `_Inert`.
_MODULE_CLASSES = frozenset(
    {
        "torchxrayvision.models.DenseNet",
        "torchxrayvision.models._DenseBlock",
        "torchxrayvision.models._DenseLayer",
        "torchxrayvision.models._Transition",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.batchnorm.BatchNorm2d",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.conv.Conv2d",
        "torch.nn.modules.linear.Linear",
        "torch.nn.modules.pooling.AvgPool2d",
        "torch.nn.modules.pooling.MaxPool2d",
    }
)
_GLOBALS: dict[str, object] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,  # protocol 2, as torch.save writes it
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    # every module's `_backend` under torch < 1.5; returns None
    "torch.nn.backends.thnn._get_thnn_function_backend": _get_thnn_function_backend,
}
# what unpickling a damaged or hostile file raises
_UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
)


class _Unpickler(pickle.Unpickler):
    """Resolves `_GLOBALS` and `_MODULE_CLASSES` only: Python's restricted-globals unpickler."""

    def find_class(self, module: str, name: str) -> object:
        path = f"{module}.{name}"
        if path in _MODULE_CLASSES:
            return _Inert
        if path in _GLOBALS:
            return _GLOBALS[path]
        raise pickle.UnpicklingError(f"refers to {path}, which TorchXRayVision's weights never do")


class _Pickle:
    """The `pickle_module` torch.load unpickles with (its header too): `_Unpickler` only."""

    Unpickler = _Unpickler

    @staticmethod
    def load(file: BinaryIO, **kwargs: object) -> object:
        return _Unpickler(file, **kwargs).load()


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state dict, read without running code from the file (`weights_only=True`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CxrError(
            f"{path}: not a state dict readable without running code from it (TorchXRayVision's "
            "published files are pickled models: put one where torchxrayvision looks and pass "
            "--weights torchxrayvision:NAME, or save its state_dict())"
        ) from exc
    if not isinstance(state, Mapping):
        raise CxrError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
