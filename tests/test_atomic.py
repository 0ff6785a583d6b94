"""Atomic writes: all or nothing at the target, and never through a link planted beside it."""

from __future__ import annotations

import os

import pytest

from cxrfusion.atomic import atomic_path, write_atomic


def test_a_symlink_planted_at_the_old_predictable_name_does_not_redirect_the_write(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f".report.md.{os.getpid()}.tmp").symlink_to(victim)

    write_atomic(shared / "report.md", "# report")

    assert victim.read_text() == "precious"
    assert not (shared / "report.md").is_symlink()
    assert (shared / "report.md").read_text() == "# report"


def test_the_file_gets_the_mode_the_umask_gives_as_open_would(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_atomic(tmp_path / "split.csv", "a,b\n")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640


def test_an_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_atomic(tmp_path / "metrics.json", "{}")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"auc": ')
        raise RuntimeError("interrupted")
    assert path.read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_each_write_uses_a_new_temporary_name(tmp_path):
    names = []
    for _ in range(2):
        with atomic_path(tmp_path / "a.txt") as tmp:
            names.append(tmp.name)
            assert tmp.is_file() and not tmp.is_symlink()
    assert names[0] != names[1] and all(n.startswith(".a.txt.") for n in names)
