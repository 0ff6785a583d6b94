"""The models: the report's parameter counts, the features/head split, freezing, weights files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import timm.models._builder
import torch
from torch import nn

from cxrfusion.errors import CxrError
from cxrfusion.labels import NUM_LABELS
from cxrfusion.models import (
    CxrModel,
    count_parameters,
    create_model,
    list_models,
    save_backbone_weights,
)

NAMES = ["simple_cnn", "densenet121", "efficientnet_b0", "fusion"]
REPORT_FUSION_TOTAL = 10_638_528


@pytest.fixture(scope="module")
def models() -> dict[str, CxrModel]:
    """One model per registered name, in eval mode; tests that change a model build their own."""
    torch.manual_seed(0)
    return {name: create_model(name).eval() for name in NAMES}


def _perturb(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator))


def _dropouts(module: nn.Module) -> set[int]:
    return {id(m) for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)}


def test_registry_lists_the_reports_models() -> None:
    assert list_models() == sorted(NAMES)


def test_simple_cnn_has_the_reports_129870_parameters(models: dict[str, CxrModel]) -> None:
    counts = count_parameters(models["simple_cnn"])
    assert counts == {"total": 129_870, "phase1_trainable": 129_870, "phase2_trainable": 129_870}
    assert not models["simple_cnn"].has_backbone


@pytest.mark.parametrize(("name", "head"), [("densenet121", 531_982), ("efficientnet_b0", 663_054)])
def test_backbone_models_train_the_reports_head_size_in_phase_1(
    models: dict[str, CxrModel], name: str, head: int
) -> None:
    counts = count_parameters(models[name])
    assert counts["phase1_trainable"] == head
    assert counts["phase2_trainable"] == counts["total"] > head


def test_fusion_total_is_within_ten_percent_of_the_reports(models: dict[str, CxrModel]) -> None:
    counts = count_parameters(models["fusion"])
    assert counts["total"] == 10_533_624  # the count the fusion docstring documents
    assert abs(counts["total"] - REPORT_FUSION_TOTAL) / REPORT_FUSION_TOTAL < 0.10
    assert counts["phase1_trainable"] == 1_389_614


def test_fusion_backbones_are_cut_after_their_taps(models: dict[str, CxrModel]) -> None:
    efficientnet = models["fusion"].backbones()["efficientnet_b3"]
    assert (
        len(efficientnet.blocks) == 5
    )  # blocks.0-4; blocks.5-6 and conv_head never reach the output
    assert isinstance(efficientnet.conv_head, nn.Identity)


@pytest.mark.parametrize(
    ("name", "size"),
    [(n, s) for n in NAMES for s in (64, 224) if (n, s) != ("fusion", 64)],  # fusion: 224 only
)
def test_forward_returns_one_logit_per_class(
    models: dict[str, CxrModel], name: str, size: int
) -> None:
    with torch.no_grad():
        logits = models[name](torch.randn(2, 3, size, size))
    assert logits.shape == (2, NUM_LABELS)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_head_of_features_is_forward_in_eval_mode(models: dict[str, CxrModel], name: str) -> None:
    model = models[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (2, model.num_features)
        torch.testing.assert_close(model.head(features), model(x))


@pytest.mark.parametrize("name", NAMES)
def test_all_dropout_lives_in_the_head(models: dict[str, CxrModel], name: str) -> None:
    model = models[name]
    everywhere, in_head = _dropouts(model), _dropouts(model.head)
    assert everywhere == in_head
    assert bool(in_head) == (name != "simple_cnn")  # simple_cnn: no dropout, MC std is zero


def test_active_dropout_in_a_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="belongs in the head"):
        create_model("densenet121", drop_rate=0.2)


@pytest.mark.parametrize("name", ["densenet121", "fusion"])
def test_freezing_leaves_only_the_non_backbone_part_trainable(name: str) -> None:
    model = create_model(name)
    model.freeze_backbone(True)
    backbone = {id(p) for p in model.backbone_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(id(p) in backbone for p in trainable)
    assert sum(p.numel() for p in trainable) == count_parameters(model)["phase1_trainable"]
    if name == "densenet121":  # its head is the whole non-backbone part
        assert {id(p) for p in trainable} == {id(p) for p in model.head.parameters()}
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_backbone_batchnorm_keeps_its_statistics_in_train_mode() -> None:
    model = create_model("efficientnet_b0")
    model.freeze_backbone(True)
    model.train()
    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.head.training and not any(m.training for m in norms)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before, strict=True))
    model.freeze_backbone(False)
    assert all(m.training for m in norms)


def test_unknown_model_name_raises_cxr_error_listing_the_choices() -> None:
    with pytest.raises(CxrError, match="unknown model 'densenet_121'") as raised:
        create_model("densenet_121")
    assert all(name in str(raised.value) for name in NAMES)
    assert "timm" in str(raised.value)


def test_any_timm_backbone_name_gets_the_reports_head() -> None:
    model = create_model("resnet18", num_classes=3)
    assert model.backbones().keys() == {"resnet18"}
    assert count_parameters(model)["phase1_trainable"] == 512 * 512 + 512 + 512 * 3 + 3
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("name", NAMES)
def test_gradcam_target_layers_produce_conv_maps(models: dict[str, CxrModel], name: str) -> None:
    model = models[name]
    seen: list[torch.Size] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
        for layer in model.gradcam_target_layers()
    ]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen and all(len(shape) == 4 and shape[0] == 1 for shape in seen)


@pytest.mark.parametrize("name", ["simple_cnn", "efficientnet_b0", "fusion"])
def test_channels_last_gives_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_b0", "fusion"])
def test_saved_backbone_weights_load_into_a_fresh_model(tmp_path: Path, name: str) -> None:
    source = create_model(name)
    for index, backbone in enumerate(source.backbone_modules()):
        _perturb(backbone, seed=index)
    path = save_backbone_weights(source, tmp_path / "backbones.pth")
    loaded = create_model(name, weights=path)
    for expected, actual in zip(source.backbone_modules(), loaded.backbone_modules(), strict=True):
        torch.testing.assert_close(actual.state_dict(), expected.state_dict(), rtol=0, atol=0)
    head = next(loaded.head.parameters())
    assert not torch.equal(head, next(source.head.parameters()))  # only backbones are loaded


def test_a_ddp_training_checkpoint_loads_into_the_backbone(tmp_path: Path) -> None:
    source = timm.create_model("efficientnet_b0", num_classes=1000)
    _perturb(source, seed=1)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "checkpoint.pth")
    model = create_model("efficientnet_b0", weights=tmp_path / "checkpoint.pth")
    expected = source.state_dict()["conv_stem.weight"]
    torch.testing.assert_close(model.features.conv_stem.weight, expected, rtol=0, atol=0)


def test_a_file_matching_nothing_raises_one_line_cxr_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(CxrError, match="none of its 1 entries matches") as raised:
        create_model("efficientnet_b0", weights=path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_partially_matching_file_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dict = create_model("efficientnet_b0").features.state_dict()
    del state_dict["conv_stem.weight"]
    torch.save(state_dict, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="cxrfusion.models.weights"):
        create_model("efficientnet_b0", weights=tmp_path / "partial.pth")
    assert "1 of" in caplog.text and "conv_stem.weight" in caplog.text


def test_fusion_needs_a_file_keyed_by_backbone_name(tmp_path: Path) -> None:
    path = tmp_path / "flat.pth"
    torch.save(create_model("efficientnet_b0").features.state_dict(), path)
    with pytest.raises(CxrError, match="densenet121.*efficientnet_b3"):
        create_model("fusion", weights=path)


def test_a_missing_weights_file_is_a_cxr_error(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="imagenet.*none.*existing weights file"):
        create_model("densenet121", weights=tmp_path / "absent.pth")


def test_an_unreadable_weights_file_is_a_cxr_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CxrError, match="not a readable PyTorch weights file"):
        create_model("efficientnet_b0", weights=path)


def test_simple_cnn_rejects_a_weights_file_and_ignores_imagenet(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({}, path)
    with pytest.raises(CxrError, match="no pretrained backbone"):
        create_model("simple_cnn", weights=path)
    assert count_parameters(create_model("simple_cnn", weights="imagenet"))["total"] == 129_870


def test_imagenet_without_network_names_the_offline_alternative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*_args: object, **_kwargs: object) -> None:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    with pytest.raises(CxrError, match="cannot download") as raised:
        create_model("efficientnet_b0", weights="imagenet")
    message = str(raised.value)
    assert "--weights /path/to" in message and "pretrained=True" in message
    assert "\n" not in message
