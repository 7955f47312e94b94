"""Atomic writes: all or nothing, and finished files get ordinary permissions."""

import os
import stat

import pytest

from leadkd.runtime.fileio import atomic_directory, atomic_write


def test_atomic_write_replaces_whole_file_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "run.trec"
    with atomic_write(target) as handle:
        handle.write("first\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.trec"]  # no temporary left behind


def test_atomic_outputs_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_atomic_directory_replaces_its_own_folder_only(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "meta.json").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "meta.json").write_text("2")
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "new"]
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "broken").write_text("3")
            raise ValueError
    assert sorted(p.name for p in target.iterdir()) == ["meta.json", "new"]


def test_atomic_directory_never_replaces_a_users_folder_or_file(tmp_path):
    from leadkd.runtime.errors import LeadkdError

    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    with pytest.raises(LeadkdError, match="did not write"):
        with atomic_directory(mine):
            pass
    assert (mine / "chapter1.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(LeadkdError, match="is a file"):
        with atomic_directory(a_file):
            pass
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]
