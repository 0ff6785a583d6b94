"""Outputs named after inputs stay valid file names however long the input's name (issue 19)."""

from __future__ import annotations

import re
import shutil

from cxrfusion.explain import MAX_STEM_BYTES, figure_name
from cxrfusion.inference.classifier import Classifier
from cxrfusion.inference.predict import predict_files

LONG_STEM = "x" * 251  # with ".png", the longest name a file system takes


def test_a_short_name_is_kept_as_it_is():
    assert figure_name("00003", "scans/00000013_019.png") == "00003_00000013_019.png"


def test_long_stems_are_cut_to_a_valid_name_that_keeps_them_apart():
    first, second = figure_name("00000", LONG_STEM + "a"), figure_name("00000", LONG_STEM + "b")
    assert first != second
    assert first.startswith("00000_" + "x" * 50)
    assert len(first.encode()) <= len("00000_.png") + MAX_STEM_BYTES


def test_a_long_stem_of_multibyte_characters_is_cut_between_characters():
    name = figure_name("00000", "é" * 200 + ".png")  # 400 bytes in UTF-8
    assert len(name.encode()) <= len("00000_.png") + MAX_STEM_BYTES
    assert re.fullmatch(r"00000_é+_[0-9a-f]{8}\.png", name)  # no half character at the cut


def test_predict_writes_the_overlay_of_an_image_with_a_251_character_stem(
    mc_dropout_run, phantoms, tmp_path
):
    image = shutil.copy(next((phantoms / "images").glob("*.png")), tmp_path / f"{LONG_STEM}.png")
    classifier = Classifier.load(mc_dropout_run, mc_samples=2)
    result = predict_files(classifier, [image], tmp_path / "out", gradcam=True, progress=False)
    [overlay] = (tmp_path / "out" / "gradcam").iterdir()
    assert overlay in result.files and overlay.stat().st_size > 1000
    assert overlay.name == figure_name("00000", image)
