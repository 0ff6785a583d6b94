"""What makes training fast, as specifications: no step waits for the device, cuDNN autotunes unless
asked not to, `--compile` and the image cache on the device train the same runs as the defaults."""

import dataclasses
import traceback
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cxrfusion.cli import build_parser
from cxrfusion.cli.training import train_config
from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.data.options import Augmentation
from cxrfusion.inference.runs import load_run
from cxrfusion.training import fit
from cxrfusion.training.config import TrainConfig
from cxrfusion.training.data import CxrDataModule
from cxrfusion.training.device_data import DeviceCache, RowBatches, wants_device_cache
from cxrfusion.training.fit import train

PHANTOM_SIZE = 64  # conftest.py's phantoms and cache
TINY = dict(
    model="simple_cnn",
    weights="none",
    cache_size=PHANTOM_SIZE,
    input_size=48,  # below the cache side: the resize and the zoom do real work
    workers=0,
    batch_size=16,
    epochs=2,
    limit_train_batches=4,
)
# Reading a tensor's value on the host: on a GPU each of these waits for every queued kernel.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _datasets(n: int = 40, side: int = 32) -> dict[str, CachedXrayDataset]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    targets = (rng.random((n, 14)) < 0.2).astype(np.float32)
    rows = rng.permutation(n)
    return {
        "train": CachedXrayDataset(images, rows[:30], targets[:30], 24, Augmentation(), seed=1),
        "val": CachedXrayDataset(images, rows[30:], targets[30:], 24),
    }


def test_a_batch_from_the_device_cache_is_the_loaders_batch_for_the_same_keys():
    datasets = _datasets()
    cache = DeviceCache(list(datasets.values()), torch.device("cpu"))
    for name, keys in (("train", [(3, i) for i in (4, 0, 29, 7)]), ("val", [0, 9, 2])):
        dataset = datasets[name]
        loader = dataset.__getitems__(keys)
        rows = RowBatches(dataset, cache.positions(dataset)).__getitems__(keys)
        images, targets, indices = cache.batch(rows, dataset)
        expected = torch.stack([sample[0] for sample in loader])
        assert images.shape == expected.shape == (len(keys), 1, 24, 24)
        # the two warps agree to OpenCV's fixed-point rounding (tests/test_device_augment.py)
        assert (images.int() - expected.int()).abs().max() <= 6, name
        torch.testing.assert_close(targets, torch.stack([sample[1] for sample in loader]))
        torch.testing.assert_close(indices, torch.stack([sample[2] for sample in loader]))


def test_auto_holds_the_cache_on_a_gpu_only(monkeypatch):
    assert not wants_device_cache("auto", torch.device("cpu"), 1)
    assert wants_device_cache("on", torch.device("cpu"), 10**15)
    assert not wants_device_cache("off", torch.device("cuda"), 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (16 * 10**9, 80 * 10**9))
    assert wants_device_cache("auto", torch.device("cuda"), 4 * 10**9)  # a quarter of free
    assert not wants_device_cache("auto", torch.device("cuda"), 4 * 10**9 + 1)


def test_loaders_pin_their_batches_for_a_gpu_only():
    data = CxrDataModule(_datasets(), batch_size=8, workers=0, seed=0)
    for device, pinned in (("cpu", False), ("cuda", True)):
        strategy = SimpleNamespace(root_device=torch.device(device))
        data.trainer = SimpleNamespace(strategy=strategy, world_size=1, global_rank=0)
        assert data.train_dataloader().pin_memory is pinned
        assert data.val_dataloader().pin_memory is pinned


class _HostReads(L.Callback):
    """Records where a tensor's value is read on the host from the first training batch's start
    to the last one's end: every step, the loading of the next batch and Lightning's logging and
    progress bar between steps (validation and the epoch's end may read: they run once)."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.batches = 0
        self.device_cache = False
        self._saved: dict[str, object] = {}

    def _record(self, name: str):
        original = self._saved[name]

        def read(tensor: torch.Tensor, *args, **kwargs):
            stack = traceback.extract_stack()[:-1]
            # Adam's step counters live on the CPU even for a model on a GPU: reading them waits
            # for nothing, so they are not what this test is about.
            if not any("torch/optim/" in frame.filename for frame in stack[-4:]):
                where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack[-6:]]
                self.reads.append(f"Tensor.{name} from " + " < ".join(reversed(where)))
            return original(tensor, *args, **kwargs)

        return read

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.device_cache = trainer.datamodule.device_cache is not None
            for name in HOST_READS:
                self._saved[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._record(name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if batch_idx == trainer.num_training_batches - 1:
            for name, original in self._saved.items():
                setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def both_paths(prepared, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """The same tiny run through the loader ("off") and the device cache ("on", on the CPU),
    each watched by `_HostReads`."""
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path_factory.mktemp(f"cache_on_device_{mode}")
        spy = _HostReads()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fit, "_trainer", _with_callback(fit._trainer, spy))
            train(TrainConfig(prepared=str(prepared), out=str(out), cache_on_device=mode, **TINY))
        config = yaml.safe_load((out / "config.yaml").read_text())
        runs[mode] = SimpleNamespace(
            metrics=pd.read_csv(out / "metrics.csv"), spy=spy, config=config
        )
    return runs


def _with_callback(make_trainer, callback: L.Callback):
    def make(*args, **kwargs) -> L.Trainer:
        trainer = make_trainer(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer

    return make


@pytest.mark.parametrize("mode", ["off", "on"])
def test_no_training_step_reads_a_tensor_back_to_the_host(both_paths, mode):
    """On a GPU such a read waits for every queued kernel: the host stops feeding the device.
    Checked on the CPU by watching every host read from the first batch to the last (forward,
    loss, logging, backward, optimiser step, callbacks, next batch) in real runs of both paths."""
    spy = both_paths[mode].spy
    assert spy.batches == TINY["epochs"] * TINY["limit_train_batches"]
    assert not spy.reads, "\n".join(spy.reads[:5])


def test_the_device_path_trains_the_run_the_loader_path_trains(both_paths):
    """Same draws, same batches, same dropout: the two paths differ by interpolation rounding."""
    assert [both_paths[mode].spy.device_cache for mode in ("off", "on")] == [False, True]
    assert both_paths["on"].config["cache_on_device"] == "on"
    off, on = both_paths["off"].metrics, both_paths["on"].metrics
    for column in ("train_loss", "val_loss", "val_auc_macro"):
        np.testing.assert_allclose(on[column], off[column], rtol=0.02, atol=0.01)


def test_cudnn_autotunes_where_the_run_starts_unless_deterministic(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # Lightning sets it
    fit._trainer(TrainConfig(out=str(tmp_path)), tmp_path, frozen_phase=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    try:
        fit._trainer(TrainConfig(out=str(tmp_path), deterministic=True), tmp_path, False)
        assert not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_speed_flags_reach_the_runs_config():
    args = build_parser().parse_args(
        ["train", "--compile", "--cache-on-device", "off", "--deterministic", "--channels-last",
         "false"]
    )  # fmt: skip
    config = train_config(args)
    assert (config.compile, config.cache_on_device, config.deterministic) == (True, "off", True)
    assert config.channels_last is False
    saved = yaml.safe_load(config.to_yaml())
    assert saved["compile"] is True and saved["cache_on_device"] == "off"
    default = train_config(build_parser().parse_args(["train"]))
    assert (default.compile, default.cache_on_device, default.deterministic) == (
        False,
        "auto",
        False,
    )


def test_compile_wraps_the_model_and_keeps_its_checkpoint_keys():
    config = TrainConfig(model="simple_cnn", weights="none")
    eager = fit._module(config)
    compiled = fit._module(dataclasses.replace(config, compile=True))
    assert eager.model._compiled_call_impl is None
    assert compiled.model._compiled_call_impl is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_a_compiled_run_trains_resumes_and_loads_without_compiling(prepared, tmp_path, monkeypatch):
    """torch.compile's default backend (inductor) spends ~40 s compiling C++ on this CPU: here
    Dynamo captures the model in a real run and hands the graphs to its eager backend, which
    exercises everything `--compile` changes in our code (bench/train_step.py runs inductor)."""
    monkeypatch.setattr(fit, "COMPILE_OPTIONS", {"backend": "eager"})
    compiles = []
    original = torch.compile

    def counting(*args, **kwargs):
        compiles.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    out = tmp_path / "run"
    config = TrainConfig(prepared=str(prepared), out=str(out), compile=True, **TINY)
    train(dataclasses.replace(config, epochs=1))
    assert compiles == [{"backend": "eager"}]
    assert yaml.safe_load((out / "config.yaml").read_text())["compile"] is True
    train(config, resume=True)  # compiled again, from the compiled run's checkpoint
    assert len(compiles) == 2
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [0, 1]
    model, _ = load_run(out)
    assert model._compiled_call_impl is None  # inference runs the plain model
