"""A model head with its dropout as inputs: what makes MC dropout exportable to a fixed graph.

`MaskedHead(head, F)(features, *masks)` is `head(features)` with every `nn.Dropout` replaced by
multiplication with the given mask: Bernoulli(1 - p) / (1 - p) masks reproduce training-mode
dropout, masks of ones the deterministic head. The masks are drawn by the caller (on the NumPy side
for ONNX Runtime, `onnx_engine.draw_masks`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cxrfusion.inference.onnx_engine import DropoutLayer


class _MaskSlot(nn.Module):
    """Stands where a dropout layer was: multiplies its input by the mask `MaskedHead` set."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def dropout_layers(head: nn.Module, num_features: int) -> list[DropoutLayer]:
    """The head's active dropout layers in execution order, with the width of their input.

    Args:
        head: a model's head (features (N, num_features) -> logits).
        num_features: width of the features the head takes.

    Raises:
        ValueError: for a dropout kind other than element-wise `nn.Dropout` with p > 0
            (channel dropout or AlphaDropout would need other masks) or a non-2-D input.
    """
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(name, tuple(inputs[0].shape))

    hooks = []
    for name, module in head.named_modules():
        if not isinstance(module, nn.modules.dropout._DropoutNd) or module.p == 0:
            continue
        if type(module) is not nn.Dropout:
            raise ValueError(f"head dropout {name!r} is {type(module).__name__}: only nn.Dropout")
        hooks.append(module.register_forward_pre_hook(lambda _m, x, name=name: record(name, x)))
    try:
        was_training = head.training
        with torch.no_grad():
            head.eval()(torch.zeros(2, num_features))
        head.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    for name, shape in seen.items():  # dicts keep insertion order: the order of execution
        if len(shape) != 2:
            raise ValueError(f"head dropout {name!r} sees a {len(shape)}-D input; need (N, D)")
        layers.append(DropoutLayer(name, float(head.get_submodule(name).p), shape[1]))
    return layers


class MaskedHead(nn.Module):
    """A head whose `nn.Dropout` layers are multiplications by masks given as inputs.

    `MaskedHead(head, F)(features, *masks)` equals `head(features)` in training mode when
    `masks[i]` is the mask dropout layer `layers[i]` would draw (Bernoulli(1 - p) / (1 - p),
    shape (N, width)), and `head(features)` in eval mode when all masks are ones. Inert dropout
    (p = 0) becomes `nn.Identity`. The given head is copied, never changed.

    Args:
        head: the model's head.
        num_features: width of the features it takes.
    """

    def __init__(self, head: nn.Module, num_features: int) -> None:
        super().__init__()
        self.head = copy.deepcopy(head).eval()
        self.layers = dropout_layers(self.head, num_features)
        for name, module in list(self.head.named_modules()):
            if isinstance(module, nn.modules.dropout._DropoutNd):
                self.head.set_submodule(name, nn.Identity())
        self.slots = [_MaskSlot() for _ in self.layers]
        for layer, slot in zip(self.layers, self.slots, strict=True):
            self.head.set_submodule(layer.name, slot)

    def forward(self, features: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        if len(masks) != len(self.slots):
            raise ValueError(f"expected {len(self.slots)} masks, got {len(masks)}")
        for slot, mask in zip(self.slots, masks, strict=True):
            slot.mask = mask
        try:
            return self.head(features)
        finally:
            for slot in self.slots:
                slot.mask = None
