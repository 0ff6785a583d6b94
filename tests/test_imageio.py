"""Specifications for image decoding: formats, deliberate conversions, and refusal of bad files."""

from __future__ import annotations

import logging
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicoms import compress, write_dicom
from PIL import Image, ImageFile
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxrfusion.data.dicom_image import MAX_DICOM_BYTES
from cxrfusion.data.imageio import (
    IMAGE_SUFFIXES,
    check_image,
    read_image,
    read_radiograph,
    read_resized,
    resize_square,
)
from cxrfusion.data.pixels import MAX_PIXELS
from cxrfusion.errors import CxrError

FULLRES_IMAGES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "nih14-fullres" / "images"
)
PARTIAL_RANGE_IMAGE = FULLRES_IMAGES / "00001873_000.png"  # grey levels 11..229, not 0..255


# ---------------------------------------------------------------------------- corpus builders


def _gradient(height: int = 48, width: int = 64) -> np.ndarray:
    """A uint8 image whose every pixel differs from its neighbours (catches flips and shifts)."""
    rows = np.arange(height, dtype=np.uint16)[:, None] * 3
    cols = np.arange(width, dtype=np.uint16)[None, :]
    return ((rows + cols) % 256).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A real PNG whose IHDR claims width x height 8-bit gray pixels, with a tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    signature = b"\x89PNG\r\n\x1a\n"
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path.write_bytes(signature + chunks)
    return path


def _ramp_12bit() -> np.ndarray:
    """64x64 raw detector values rising 0..4032 across the columns."""
    return np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (64, 1))


_WINDOWED = {
    "RescaleSlope": 2,
    "RescaleIntercept": -1000,
    "WindowCenter": 1000,
    "WindowWidth": 2000,
}


def _assert_one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CxrError, match=match) as caught:
        read_image(path)
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    return message


# ---------------------------------------------------------------------------- plain formats


def test_read_image_returns_8bit_grayscale_png_unchanged(tmp_path: Path) -> None:
    pixels = _gradient()
    image = read_image(_write_png(tmp_path / "gray.png", pixels))
    assert image.dtype == np.uint8
    assert image.flags.writeable
    np.testing.assert_array_equal(image, pixels)


def test_read_image_decodes_jpeg_to_2d_grayscale_close_to_the_original(tmp_path: Path) -> None:
    pixels = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :], 48, axis=0)
    path = tmp_path / "study.jpg"
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    image = read_image(path)
    assert image.shape == (48, 64)
    assert image.dtype == np.uint8
    assert np.abs(image.astype(int) - pixels).mean() < 2


def test_read_image_stretches_16bit_png_from_its_own_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 12-bit detector values stored in 16 bits: dividing by 65535 would give a black image.
    pixels = rng.permutation(np.linspace(100, 4000, 40 * 50).astype(np.uint16)).reshape(40, 50)
    path = tmp_path / "sixteen.png"
    Image.fromarray(pixels).save(path, format="PNG")
    assert Image.open(path).mode in ("I;16", "I")

    image = read_image(path)
    assert image.dtype == np.uint8
    assert image.flat[pixels.argmin()] == 0
    assert image.flat[pixels.argmax()] == 255
    order = np.argsort(pixels, axis=None)
    assert np.all(np.diff(image.flat[order].astype(int)) >= 0)
    assert abs(int(image.flat[order[order.size // 2]]) - 128) <= 2


def test_read_image_maps_a_constant_16bit_png_to_black(tmp_path: Path) -> None:
    path = tmp_path / "flat16.png"
    Image.fromarray(np.full((20, 20), 3000, dtype=np.uint16)).save(path, format="PNG")
    np.testing.assert_array_equal(read_image(path), np.zeros((20, 20), dtype=np.uint8))


def test_read_image_converts_rgb_with_itu_601_luma(tmp_path: Path) -> None:
    colours = np.zeros((20, 20, 3), dtype=np.uint8)
    colours[:, :5] = (255, 0, 0)
    colours[:, 5:10] = (0, 255, 0)
    colours[:, 10:15] = (0, 0, 255)
    colours[:, 15:] = (90, 90, 90)
    image = read_image(_write_png(tmp_path / "rgb.png", colours))
    assert image.shape == (20, 20)
    expected_columns = {0: 0.299 * 255, 5: 0.587 * 255, 10: 0.114 * 255, 15: 90}
    for column, luma in expected_columns.items():
        assert abs(int(image[0, column]) - luma) <= 1


def test_read_image_drops_alpha_so_rgba_equals_the_grayscale_of_its_rgb(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(24, 32, 4), dtype=np.uint8)
    with caplog.at_level(logging.DEBUG, logger="cxrfusion.data.imageio"):
        from_rgba = read_image(_write_png(tmp_path / "rgba.png", rgba))
    assert "RGBA" in caplog.text
    from_rgb = read_image(_write_png(tmp_path / "rgb.png", np.ascontiguousarray(rgba[..., :3])))
    assert from_rgba.shape == (24, 32)
    np.testing.assert_array_equal(from_rgba, from_rgb)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_read_image_converts_gray_alpha_and_palette_pngs(tmp_path: Path, mode: str) -> None:
    pixels = _gradient()
    path = tmp_path / f"{mode}.png"
    Image.fromarray(pixels).convert(mode).save(path, format="PNG")
    image = read_image(path)
    assert image.shape == pixels.shape
    assert np.abs(image.astype(int) - pixels).max() <= 8  # a 256-colour palette may quantise


def test_image_suffixes_list_the_accepted_formats() -> None:
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


# ---------------------------------------------------------------------------- DICOM


def test_read_dicom_applies_rescale_then_window(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    image = read_image(write_dicom(tmp_path / "windowed.dcm", raw, **_WINDOWED))

    # DICOM PS3.3 C.11.2.1.2 linear window on the rescaled values, spread over 0..255.
    values = raw.astype(float) * 2 - 1000
    center, width = 1000 - 0.5, 2000 - 1
    expected = np.rint(np.clip((values - center) / width + 0.5, 0, 1) * 255)
    assert image.dtype == np.uint8
    assert image.shape == raw.shape
    assert np.abs(image.astype(int) - expected).max() <= 1


def test_read_dicom_applies_a_sigmoid_window(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    elements = {"WindowCenter": 2000, "WindowWidth": 1000, "VOILUTFunction": "SIGMOID"}
    image = read_image(write_dicom(tmp_path / "sigmoid.dcm", raw, **elements))
    # DICOM PS3.3 C.11.2.1.3.1, spread over 0..255.
    expected = 255 / (1 + np.exp(-4 * (raw.astype(float) - 2000) / 1000))
    assert np.abs(image - expected).max() <= 0.5 + 1e-3


def test_read_dicom_maps_the_output_range_of_its_voi_lut_onto_8_bits(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    lut = (np.sqrt(np.linspace(0, 1, 4096)) * 3000 + 500).astype(np.uint16)  # 500..3500
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    # The LUT wins over a window in the same header, as in pydicom and most viewers.
    elements = {"VOILUTSequence": Sequence([item]), "WindowCenter": 10, "WindowWidth": 20}
    image = read_image(write_dicom(tmp_path / "lut.dcm", raw, **elements))
    expected = (lut[raw].astype(float) - 500) / 3000 * 255
    assert np.abs(image - expected).max() <= 0.5 + 1e-3


def test_read_dicom_of_more_than_8_bits_without_window_stretches_its_own_range(
    tmp_path: Path,
) -> None:
    raw = _ramp_12bit() + 50  # 50..4082: neither the 12-bit range nor starting at 0
    image = read_image(write_dicom(tmp_path / "plain.dcm", raw, RescaleSlope=1, RescaleIntercept=0))
    assert image[0, 0] == 0
    assert image[0, -1] == 255
    assert np.all(np.diff(image[0].astype(int)) > 0)


def test_an_8bit_dicom_is_taken_as_stored_like_an_8bit_png(tmp_path: Path) -> None:
    pixels = (_gradient() % 200 + 20).astype(np.uint8)  # 20..219: a stretch would change it
    png = read_image(_write_png(tmp_path / "same.png", pixels))
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "m2.dcm", pixels)), png)
    mono1 = write_dicom(tmp_path / "m1.dcm", 255 - pixels, "MONOCHROME1")
    np.testing.assert_array_equal(read_image(mono1), png)


def test_an_8bit_dicom_is_taken_as_rescaled_while_that_stays_within_0_to_255(
    tmp_path: Path,
) -> None:
    pixels = (_gradient() % 200 + 20).astype(np.uint8)
    shifted = write_dicom(tmp_path / "s.dcm", pixels, RescaleSlope=1, RescaleIntercept=-20)
    np.testing.assert_array_equal(read_image(shifted), pixels - 20)
    # Rescaled to 40..438 there is no 8-bit value to keep: the range is stretched.
    doubled = write_dicom(tmp_path / "d.dcm", pixels, RescaleSlope=2, RescaleIntercept=0)
    image = read_image(doubled)
    assert image.min() == 0 and image.max() == 255
    np.testing.assert_array_equal(
        np.argsort(image, axis=None, kind="stable"), np.argsort(pixels, axis=None, kind="stable")
    )


@pytest.mark.parametrize(
    ("elements", "match"),
    [
        ({"WindowCenter": 100, "WindowWidth": 1}, "WindowWidth 1 leaves no grey levels"),
        ({"WindowCenter": 100, "WindowWidth": 9, "VOILUTFunction": "GAMMA"}, "'GAMMA'"),
    ],
)
def test_dicom_grey_levels_that_cannot_be_computed_are_one_line_errors(
    tmp_path: Path, elements: dict, match: str
) -> None:
    _assert_one_line_error(write_dicom(tmp_path / "odd.dcm", _ramp_12bit(), **elements), match)


def test_read_dicom_inverts_monochrome1(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", **_WINDOWED))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", **_WINDOWED))
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_read_image_recognises_dicom_by_its_preamble_whatever_the_suffix(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    dicom = write_dicom(tmp_path / "real.dcm", raw)
    renamed = tmp_path / "exported.png"
    renamed.write_bytes(dicom.read_bytes())
    np.testing.assert_array_equal(read_image(renamed), read_image(dicom))


def test_a_rescale_slope_that_is_not_a_number_is_a_one_line_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "odd.dcm", _ramp_12bit(), RescaleSlope=7)
    # pydicom refuses to write a bad number, so the bytes are edited as a faulty writer leaves them.
    path.write_bytes(path.read_bytes().replace(b"S\x10DS\x04\x007.0 ", b"S\x10DS\x04\x00high"))
    _assert_one_line_error(path, r"RescaleSlope is not a number \('high'\)")


def test_read_dicom_refuses_multi_frame(tmp_path: Path) -> None:
    frames = np.concatenate([_ramp_12bit(), _ramp_12bit()])
    path = write_dicom(tmp_path / "cine.dcm", frames, NumberOfFrames=2)
    # Rows must describe one frame for the file to be consistent.
    dataset = pydicom.dcmread(path)
    dataset.Rows = 64
    dataset.save_as(path)
    _assert_one_line_error(path, "multi-frame")


def test_read_dicom_refuses_colour(tmp_path: Path) -> None:
    interleaved = np.zeros((32, 32 * 3), dtype=np.uint16)
    path = write_dicom(tmp_path / "rgb.dcm", interleaved, "RGB", Columns=32, SamplesPerPixel=3)
    _assert_one_line_error(path, "colour DICOM")


def test_read_dicom_refuses_garbage_with_a_dicom_suffix(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"this is not a DICOM file\n" * 20)
    _assert_one_line_error(path, "not a readable DICOM")


def test_read_dicom_refuses_truncated_pixel_data(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", _ramp_12bit())
    path.write_bytes(path.read_bytes()[:-100])
    _assert_one_line_error(path, "truncated")


def test_read_dicom_checks_the_header_size_before_reading_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((16, 16), dtype=np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.Rows = dataset.Columns = 65535
    dataset.save_as(path)

    def refuse(_: Dataset) -> np.ndarray:
        raise AssertionError("pixel data decoded despite an oversized header")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    _assert_one_line_error(path, "too large: 65535x65535")


def test_read_dicom_caps_the_decoded_bytes_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 6000x6000 is within the pixel limit but 72 MB at 16 bits; 16 frames of 2048x2048, 134 MB.
    tiny = np.zeros((16, 16), dtype=np.uint16)
    deep = write_dicom(tmp_path / "deep.dcm", tiny, Rows=6000, Columns=6000)
    cine = write_dicom(tmp_path / "cine.dcm", tiny, Rows=2048, Columns=2048, NumberOfFrames=16)

    def refuse(_: Dataset) -> np.ndarray:
        raise AssertionError("pixel data decoded despite an oversized header")

    monkeypatch.setattr(Dataset, "pixel_array", property(refuse))
    for path in (deep, cine):
        message = _assert_one_line_error(path, "too large")
        assert f"limit of {MAX_DICOM_BYTES:,}" in message
        with pytest.raises(CxrError, match="too large"):
            check_image(path)
    # The same header at 8 bits decodes to 36 MB: within the limit.
    check_image(write_dicom(tmp_path / "flat.dcm", tiny.astype(np.uint8), Rows=6000, Columns=6000))


def test_dicom_grey_level_steps_make_no_float64_copies(tmp_path: Path) -> None:
    side = 1024
    raw = np.random.default_rng(5).integers(0, 4096, size=(side, side), dtype=np.uint16)
    path = write_dicom(tmp_path / "windowed.dcm", raw, **_WINDOWED)
    read_image(path)  # imports and plugin look-ups outside the measurement
    tracemalloc.start()
    try:
        read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The file's 2 bytes per pixel, pydicom's uint16 array, one float32 copy and the uint8 result
    # make 9; each float64 copy would add 8 (pydicom's own rescale and window took 25).
    assert peak < 12 * side * side


@pytest.mark.parametrize("modality", ["CT", "MR", "SEG", "SR", "PT", "NM", "US", "MG"])
def test_dicoms_of_other_modalities_are_refused_from_the_header(
    tmp_path: Path, modality: str
) -> None:
    path = write_dicom(tmp_path / "other.dcm", _ramp_12bit(), Modality=modality)
    _assert_one_line_error(path, f"Modality {modality} is not a radiograph")
    with pytest.raises(CxrError, match="not a radiograph"):
        check_image(path)


def test_radiograph_modalities_and_a_missing_modality_are_read(tmp_path: Path) -> None:
    raw = _ramp_12bit()
    expected = read_image(write_dicom(tmp_path / "dx.dcm", raw))
    for modality in ["CR", "DX", "DR", "RG", "OT", None]:
        path = write_dicom(tmp_path / f"{modality}.dcm", raw, Modality=modality)
        np.testing.assert_array_equal(read_image(path), expected)


# ---------------------------------------------------------------------------- refusals


def test_read_image_reports_a_missing_file(tmp_path: Path) -> None:
    _assert_one_line_error(tmp_path / "absent.png", "file not found")


def test_read_image_reports_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    _assert_one_line_error(path, r"empty file \(0 bytes\)")


def test_read_image_reports_a_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("Patient ID, Finding Labels\n1, Effusion\n")
    _assert_one_line_error(path, "not an image")


@pytest.mark.parametrize("keep_fraction", [0.05, 0.5, 0.95])
def test_read_image_reports_a_truncated_png(tmp_path: Path, keep_fraction: float) -> None:
    noise = np.random.default_rng(2).integers(0, 256, size=(64, 64), dtype=np.uint8)
    data = _write_png(tmp_path / "whole.png", noise).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    _assert_one_line_error(path, "truncated or corrupt|not an image")


def test_read_image_reports_a_png_with_corrupt_compressed_data(tmp_path: Path) -> None:
    noise = np.random.default_rng(3).integers(0, 256, size=(64, 64), dtype=np.uint8)
    data = bytearray(_write_png(tmp_path / "whole.png", noise).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(16)
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    _assert_one_line_error(path, "truncated or corrupt")


def test_read_image_refuses_a_1x1_image(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "dot.png", np.zeros((1, 1), dtype=np.uint8))
    _assert_one_line_error(path, "too small: 1x1")


@pytest.mark.parametrize("side", [100_000, 8_000])
def test_read_image_refuses_an_oversized_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int
) -> None:
    # 100000^2 trips Pillow's own bomb guard at open; 8000^2 (64 MP) only trips ours.
    assert side * side > MAX_PIXELS
    path = _write_png_header_only(tmp_path / "bomb.png", side, side)

    def refuse(_: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded despite an oversized header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    started = time.perf_counter()
    _assert_one_line_error(path, "too large")
    assert time.perf_counter() - started < 1.0


def test_read_image_refuses_to_run_if_pillow_accepts_truncated_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        read_image(_write_png(tmp_path / "gray.png", _gradient()))


# ---------------------------------------------------------------------------- resizing


def test_resize_square_squashes_a_non_square_image(tmp_path: Path) -> None:
    halves = np.zeros((40, 80), dtype=np.uint8)
    halves[:, 40:] = 255
    resized = resize_square(halves, 20)
    assert resized.shape == (20, 20)
    assert resized.dtype == np.uint8
    assert np.all(resized[:, :9] == 0)
    assert np.all(resized[:, 11:] == 255)


def test_resize_square_antialiases_when_downscaling() -> None:
    checkerboard = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    resized = resize_square(checkerboard, 64)
    assert np.abs(resized.astype(int) - 128).max() <= 2


def test_resize_square_rejects_non_uint8_input_and_empty_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_square(np.zeros((32, 32), dtype=np.float32), 16)
    with pytest.raises(ValueError, match="positive"):
        resize_square(_gradient(), 0)
    with pytest.raises(ValueError, match="positive"):
        read_resized(_write_png(tmp_path / "gray.png", _gradient()), 0)


def test_read_resized_equals_read_image_then_resize_square(tmp_path: Path) -> None:
    rgba = np.random.default_rng(4).integers(0, 256, size=(48, 64, 4), dtype=np.uint8)
    paths = [
        _write_png(tmp_path / "gray.png", _gradient()),
        _write_png(tmp_path / "rgba.png", rgba),
        write_dicom(tmp_path / "study.dcm", _ramp_12bit(), "MONOCHROME1", **_WINDOWED),
    ]
    for path in paths:
        resized = read_resized(path, 16)
        assert resized.shape == (16, 16)
        assert resized.flags.writeable
        np.testing.assert_array_equal(resized, resize_square(read_image(path), 16))


# ---------------------------------------------------------------------------- real NIH data


def test_real_nih_png_decodes_to_1024_square_and_resizes_identically() -> None:
    if not FULLRES_IMAGES.is_dir():
        pytest.skip(f"real NIH full-resolution images not found at {FULLRES_IMAGES}")
    path = sorted(FULLRES_IMAGES.glob("*.png"))[0]
    image = read_image(path)
    assert image.shape == (1024, 1024)
    assert image.dtype == np.uint8
    assert image.std() > 10  # a radiograph, not a blank
    first, second = read_resized(path, 256), read_resized(path, 256)
    assert first.shape == (256, 256)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, resize_square(image, 256))


def test_real_8bit_dicoms_decode_exactly_like_the_png(tmp_path: Path) -> None:
    if not PARTIAL_RANGE_IMAGE.is_file():
        pytest.skip(f"real NIH full-resolution image not found at {PARTIAL_RANGE_IMAGE}")
    png = read_image(PARTIAL_RANGE_IMAGE)
    assert png.min() > 0 and png.max() < 255  # a min..max stretch would change every pixel
    mono2 = write_dicom(tmp_path / "mono2.dcm", png)
    dicoms = [
        mono2,
        write_dicom(tmp_path / "mono1.dcm", 255 - png, "MONOCHROME1"),
        compress(mono2, tmp_path / "rle.dcm", RLELossless),
        compress(mono2, tmp_path / "j2k.dcm", JPEG2000Lossless),
    ]
    assert pydicom.dcmread(dicoms[3]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    for path in dicoms:
        np.testing.assert_array_equal(read_image(path), png, err_msg=path.name)


def test_check_image_finds_header_problems_without_decoding(tmp_path: Path) -> None:
    good = _write_png(tmp_path / "good.png", _gradient())
    check_image(good)
    check_image(write_dicom(tmp_path / "good.dcm", _ramp_12bit()))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    _write_png(tmp_path / "tiny.png", np.zeros((1, 1), dtype=np.uint8))
    _write_png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    for name, match in [
        ("empty.png", "empty file"),
        ("text.png", "not an image"),
        ("tiny.png", "too small"),
        ("huge.png", "too large"),
        ("absent.png", "not found"),
    ]:
        with pytest.raises(CxrError, match=match) as error:
            check_image(tmp_path / name)
        assert name in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------- uploads, compression, views


def test_bytes_decode_exactly_like_the_file(tmp_path: Path) -> None:
    png = _write_png(tmp_path / "g.png", _gradient())
    dicom = write_dicom(tmp_path / "r.dcm", _ramp_12bit(), "MONOCHROME1")
    for path in (png, dicom):
        from_bytes = read_radiograph(path.read_bytes(), name="upload")
        np.testing.assert_array_equal(from_bytes.pixels, read_image(path))
    # A DICOM upload is recognised by its preamble whatever its name says.
    np.testing.assert_array_equal(
        read_radiograph(dicom.read_bytes(), name="scan").pixels, read_image(dicom)
    )


@pytest.mark.parametrize("data", [b"", b"GIF89a" + b"\0" * 200])
def test_bad_uploads_are_errors_naming_the_upload(data: bytes) -> None:
    with pytest.raises(CxrError, match="^chest.png: "):
        read_radiograph(data, name="chest.png")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_compressed_dicom_decodes_to_the_uncompressed_pixels(tmp_path: Path, syntax) -> None:
    raw = (_gradient(64, 64).astype(np.uint16) * 16) + np.arange(64, dtype=np.uint16) % 16
    plain = write_dicom(tmp_path / "plain.dcm", raw)
    compressed = compress(plain, tmp_path / "compressed.dcm", syntax)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image(compressed), read_image(plain))


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        ({"ViewPosition": "PA", "BodyPartExamined": "CHEST"}, ""),
        ({"ViewPosition": "AP"}, ""),
        ({}, ""),
        ({"ViewPosition": "LL"}, "ViewPosition LL: not a frontal chest view"),
        ({"ViewPosition": "LATERAL"}, "ViewPosition LATERAL: not a frontal chest view"),
        ({"BodyPartExamined": "SKULL"}, "BodyPartExamined SKULL: not a chest radiograph"),
    ],
)
def test_dicom_headers_that_are_not_frontal_chest_views_carry_a_warning(
    tmp_path: Path, elements: dict, expected: str
) -> None:
    path = write_dicom(tmp_path / "v.dcm", _ramp_12bit(), **elements)
    decoded = read_radiograph(path)
    assert (expected in decoded.warning) and (bool(decoded.warning) == bool(expected))
    np.testing.assert_array_equal(decoded.pixels, read_image(path))


def test_dicom_without_a_required_pixel_element_is_a_user_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nobits.dcm", _ramp_12bit())
    dataset = pydicom.dcmread(path)
    del dataset.BitsStored
    dataset.save_as(path)
    _assert_one_line_error(path, "lacks BitsStored")


def test_a_code_bug_while_decoding_dicom_is_not_reported_as_a_bad_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_dicom(tmp_path / "ok.dcm", _ramp_12bit())

    def bug(*_: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr("cxrfusion.data.dicom_image._modality_values", bug)
    with pytest.raises(AttributeError):
        read_image(path)
