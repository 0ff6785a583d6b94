"""Backbone weights: ImageNet through timm, none, or a local file (machines without internet).

A weights file is, in order of preference:
- what `save_backbone_weights` writes: `{timm backbone name: state_dict}`, one entry per backbone
  (the only form accepted for models with several backbones, i.e. fusion);
- for a one-backbone model, a plain timm state dict, e.g.
  `torch.save(timm.create_model("densenet121", pretrained=True).state_dict(), "densenet121.pth")`;
- a training checkpoint holding such a state dict under `state_dict` or `model` (`module.` and
  `_orig_mod.` prefixes from DDP / torch.compile are stripped).
Files are read with `torch.load(weights_only=True)` (or safetensors): no code runs from them.

`torchxrayvision:NAME` (or `torchxrayvision:FILE`) fills a densenet121 backbone with
TorchXRayVision's chest-X-ray weights, their 1-channel input folded into conv0 (`models.txrv`);
the other backbones of a model (fusion's EfficientNet) get ImageNet weights.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.models import clean_state_dict
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from cxrfusion.atomic import atomic_path
from cxrfusion.errors import CxrError
from cxrfusion.models import txrv
from cxrfusion.models.base import CxrModel

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
NONE = "none"


def load_weights(model: CxrModel, weights: str | Path) -> None:
    """Load pretrained weights into the model's backbone(s); the head keeps its random init.

    Args:
        model: the model to fill, e.g. fresh from `create_model`.
        weights: "none" (keep the random init), "imagenet" (timm's pretrained weights, downloaded;
            a CxrError without internet), "torchxrayvision:NAME|FILE" (chest-X-ray weights for
            a densenet121 backbone, `models.txrv`) or the path of a weights file (module docstring).
            "imagenet" is ignored, with a log line, by models without a backbone (simple_cnn);
            a file is an error for them.
    """
    if str(weights) == NONE:
        return
    backbones = model.backbones()
    kind = type(model).__name__
    if not backbones:
        if str(weights) == IMAGENET:
            log.info("%s has no pretrained backbone: weights=imagenet loads nothing", kind)
            return
        raise CxrError(f"{weights}: {kind} has no pretrained backbone to load weights into")
    if str(weights) == IMAGENET:
        for name, backbone in backbones.items():
            _load_into(
                backbone, _download_imagenet(name, list(backbones)), name, f"ImageNet {name}"
            )
        return
    if txrv.is_txrv(weights):
        _load_txrv(backbones, str(weights), kind)
        return
    path = Path(weights)
    for name, state_dict in _read_weights_file(path, list(backbones)).items():
        _load_into(backbones[name], state_dict, name, str(path))


def describe_weights(weights: str | Path) -> str:
    """YAML comment lines for a run's config.yaml saying where CXR weights come from and how the
    input is mapped to them; empty for the other kinds, which the `weights` value says enough."""
    return txrv.describe(str(weights)) if txrv.is_txrv(weights) else ""


def _load_txrv(backbones: dict[str, nn.Module], weights: str, kind: str) -> None:
    if txrv.BACKBONE not in backbones:
        raise CxrError(
            f"--weights {weights}: TorchXRayVision weights fit a {txrv.BACKBONE} backbone; "
            f"{kind} has {', '.join(backbones)}"
        )
    state_dict, source = txrv.load_txrv(weights)
    for name, backbone in backbones.items():
        if name == txrv.BACKBONE:
            _load_into(backbone, state_dict, name, source)
        else:
            _load_into(
                backbone, _download_imagenet(name, list(backbones)), name, f"ImageNet {name}"
            )


def save_backbone_weights(model: CxrModel, path: Path) -> Path:
    """Write `{timm name: backbone state_dict}` atomically: the file `load_weights` reads.

    On a machine with internet, `save_backbone_weights(create_model("fusion",
    weights="imagenet"), path)` makes the file to carry to an air-gapped one.

    Args:
        model: a model with at least one backbone.
        path: where to write (parents are created).
    """
    if not model.has_backbone:
        raise CxrError(f"{path}: {type(model).__name__} has no backbone weights to save")
    with atomic_path(Path(path)) as tmp:
        torch.save({name: b.state_dict() for name, b in model.backbones().items()}, tmp)
    return Path(path)


def _offline_recipe(names: list[str]) -> str:
    return (
        'python -c "import timm, torch; torch.save({n: timm.create_model(n, pretrained=True)'
        f".state_dict() for n in {names}}}, 'backbones.pth')\""
    )


def _download_imagenet(name: str, all_names: list[str]) -> dict[str, torch.Tensor]:
    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except OSError as exc:  # no network, DNS failure, hub outage: all surface as OSError
        cause = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CxrError(
            f"--weights imagenet: cannot download the ImageNet weights of {name} ({cause}); "
            f"without internet, run on a machine that has it: {_offline_recipe(all_names)} "
            "and pass --weights /path/to/backbones.pth"
        ) from exc


def _read_weights_file(path: Path, names: list[str]) -> dict[str, Mapping[str, torch.Tensor]]:
    """The file's state dict for each backbone name (module docstring for the formats)."""
    if not path.is_file():
        raise CxrError(f"{path}: --weights must be 'imagenet', 'none' or an existing weights file")
    try:
        checkpoint = timm_load_state_dict(str(path), use_ema=False, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CxrError(f"{path}: not a readable PyTorch weights file ({first_line})") from exc
    if all(isinstance(checkpoint.get(name), Mapping) for name in names):
        return {name: clean_state_dict(checkpoint[name]) for name in names}
    if len(names) == 1:
        return {names[0]: checkpoint}
    raise CxrError(
        f"{path}: a model with backbones {names} needs a dict keyed by those names "
        "({name: state_dict}, as save_backbone_weights writes)"
    )


def _load_into(
    backbone: nn.Module, state_dict: Mapping[str, object], name: str, source: str
) -> None:
    """Copy the matching tensors; a CxrError if none match or shapes differ, a warning if some
    backbone tensors are missing. Extra tensors (classifier, pruned layers) are expected."""
    own = backbone.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own and isinstance(v, torch.Tensor)}
    if not usable:
        example = next(iter(state_dict), "nothing")
        raise CxrError(
            f"{source}: none of its {len(state_dict)} entries matches the {name} backbone "
            f"(file has e.g. {example!r}, {name} expects e.g. {next(iter(own))!r})"
        )
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise CxrError(
            f"{source}: {len(wrong)} tensors have the wrong shape for {name}, e.g. {k} "
            f"{tuple(usable[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    backbone.load_state_dict(usable, strict=False)
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        log.warning(
            "%s: %d of %d %s backbone tensors are not in it (e.g. %s); they keep their random init",
            source,
            len(missing),
            len(own),
            name,
            missing[0],
        )
    log.info("%s: loaded %d tensors into the %s backbone", source, len(usable), name)
