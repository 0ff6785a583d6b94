"""What a checkpoint carries beyond Lightning's own state, so that a resumed run repeats exactly."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class RandomState(L.Callback):
    """Checkpoints carry torch's global RNG state (dropout masks draw from it); resuming restores it.

    With the stateless sampler and per-image augmentation seeds (`training.data`), and the plateau
    step taken before the checkpoint (`CxrClassifier.on_train_epoch_end`), a run resumed from
    last.ckpt computes exactly what the uninterrupted run computes.
    """

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
