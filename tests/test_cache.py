import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cxrfusion.data.cache as cache_module
from cxrfusion.data.cache import build_cache, cache_files, open_cache
from cxrfusion.data.dataset import CachedXrayDataset
from cxrfusion.data.imageio import read_resized
from cxrfusion.data.options import Augmentation
from cxrfusion.errors import CxrError


def _write_pngs(folder: Path, count: int, side: int = 96) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:08d}_000.png"
        Image.fromarray(rng.integers(0, 256, (side, side + 8 * (i % 3)), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_a_cached_image_equals_a_fresh_decode_and_resize(tmp_path):
    paths = _write_pngs(tmp_path / "images", 5)
    cache = build_cache(paths, tmp_path / "out", size=32, progress=False)
    for path in paths:
        row = cache.rows_for([path.name])[0]
        np.testing.assert_array_equal(cache.images[row], read_resized(path, 32))


def test_an_interrupted_build_resumes_without_redoing_finished_rows(tmp_path, monkeypatch):
    paths = _write_pngs(tmp_path / "images", 7)
    monkeypatch.setattr(cache_module, "CHUNK", 3)
    decoded: list[Path] = []
    real_decode = cache_module._decode

    def dying_decode(job):
        if len(decoded) == 4:
            raise KeyboardInterrupt  # the user pressed Ctrl-C in the second chunk
        decoded.append(job[1])
        return real_decode(job)

    monkeypatch.setattr(cache_module, "_decode", dying_decode)
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, tmp_path / "out", size=16, progress=False)
    array_path, manifest_path = cache_files(tmp_path / "out", 16)
    assert not array_path.exists() and not manifest_path.exists()  # nothing half-built is published

    decoded.clear()
    monkeypatch.setattr(
        cache_module, "_decode", lambda job: (decoded.append(job[1]), real_decode(job))[1]
    )
    cache = build_cache(paths, tmp_path / "out", size=16, progress=False)
    assert decoded == paths[3:]  # the first chunk was kept
    for path in paths:
        np.testing.assert_array_equal(cache.images[cache.rows[path.name]], read_resized(path, 16))
    assert not list((tmp_path / "out").glob(".*"))  # no partial files left behind


def test_a_finished_cache_is_reused_and_a_changed_image_list_rebuilds(tmp_path, monkeypatch):
    paths = _write_pngs(tmp_path / "images", 4)
    build_cache(paths, tmp_path / "out", size=16, progress=False)
    calls: list[int] = []
    real_decode = cache_module._decode
    monkeypatch.setattr(cache_module, "_decode", lambda job: (calls.append(1), real_decode(job))[1])
    build_cache(paths, tmp_path / "out", size=16, progress=False)
    assert calls == []
    build_cache(paths[:3], tmp_path / "out", size=16, progress=False)
    assert len(calls) == 3


def test_undecodable_images_are_recorded_with_their_reason(tmp_path):
    paths = _write_pngs(tmp_path / "images", 3)
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated
    with pytest.raises(CxrError, match=f"1 image.*{paths[1].name}"):
        build_cache(paths, tmp_path / "out", size=16, progress=False)
    assert not cache_files(tmp_path / "out", 16)[0].exists()
    cache = build_cache(paths, tmp_path / "out", size=16, progress=False, allow_failures=True)
    assert list(cache.failed) == [paths[1].name]
    assert paths[1].name in cache.failed[paths[1].name]
    with pytest.raises(CxrError, match="not in the cache"):
        cache.rows_for([paths[1].name])


def test_parallel_build_matches_serial_build(tmp_path):
    paths = _write_pngs(tmp_path / "images", 6)
    serial = build_cache(paths, tmp_path / "a", size=24, progress=False)
    parallel = build_cache(paths, tmp_path / "b", size=24, workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(serial.images), np.asarray(parallel.images))


def test_opening_a_missing_cache_says_what_to_run(tmp_path):
    with pytest.raises(CxrError, match="cxrfusion prepare"):
        open_cache(tmp_path, 256)


def test_a_changed_source_file_rebuilds_the_cache(tmp_path):
    paths = _write_pngs(tmp_path / "images", 3)
    build_cache(paths, tmp_path / "out", size=16, progress=False)
    replacement = np.full((40, 40), 200, dtype=np.uint8)
    Image.fromarray(replacement).save(paths[1])  # same name, new pixels (new size and mtime)
    cache = build_cache(paths, tmp_path / "out", size=16, progress=False)
    np.testing.assert_array_equal(
        cache.images[cache.rows[paths[1].name]], read_resized(paths[1], 16)
    )


def test_a_corrupt_manifest_is_a_one_line_error_naming_it(tmp_path):
    paths = _write_pngs(tmp_path / "images", 2)
    build_cache(paths, tmp_path / "out", size=16, progress=False)
    manifest = cache_files(tmp_path / "out", 16)[1]
    for damage in ('{"size": 16, "names": [', "[1, 2]", "\xff\xfe"):
        manifest.write_bytes(damage.encode("latin-1"))
        for action in (
            lambda: open_cache(tmp_path / "out", 16),
            lambda: build_cache(paths, tmp_path / "out", size=16, progress=False),
        ):
            with pytest.raises(CxrError, match=f"{manifest}: corrupt cache manifest") as error:
                action()
            assert "\n" not in str(error.value)


def _fetch_in_a_spawned_worker(dataset: CachedXrayDataset) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    return next(iter(loader))[0]


def test_a_spawned_loader_worker_maps_the_cache_instead_of_receiving_a_copy(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (256, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "images_64.npy", images)  # 1 MiB of cache
    mapped = np.load(tmp_path / "images_64.npy", mmap_mode="r")
    dataset = CachedXrayDataset(mapped, np.arange(256)[::-1], np.zeros((256, 14)), input_size=64)
    dataset[0]  # the map is open in this process now; a pickle must still leave it out
    assert len(pickle.dumps(dataset)) < images.nbytes / 20
    batch = _fetch_in_a_spawned_worker(dataset)
    np.testing.assert_array_equal(batch[:, 0].numpy(), images[255:251:-1])


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64), dtype=np.uint8)
    np.save(tmp_path / "images_64.npy", images)
    dataset = CachedXrayDataset(
        tmp_path / "images_64.npy", np.arange(8), np.zeros((8, 14)), 48, Augmentation(), seed=3
    )
    alone = dataset[(2, 5)][0]
    in_a_batch = dataset.__getitems__([(2, 1), (2, 5), (2, 7)])[1][0]
    assert torch.equal(alone, in_a_batch)  # batch composition (workers, processes) does not matter
    assert not torch.equal(alone, dataset[(3, 5)][0])  # another epoch, another augmentation
    reseeded = CachedXrayDataset(
        tmp_path / "images_64.npy", np.arange(8), np.zeros((8, 14)), 48, Augmentation(), seed=4
    )
    assert not torch.equal(alone, reseeded[(2, 5)][0])
