"""dmhpc/files.py: the names of its temporary files and where a path lies, on real files and folders
(atomic writes and locks are tested where they are used: test_run.py, test_prepare.py, test_synth.py)."""

from __future__ import annotations

import os
from pathlib import Path

from dmhpc.files import inside, is_temporary, temporary_path


def test_only_the_names_of_dmhpcs_temporary_files_are_temporary(tmp_path):
    """A user's `.notes.tmp` or `.draft.v2.tmp` was taken for one of dmhpc's temporary files (any
    `.NAME.tmp`), and removed as a killed write's orphan."""
    made = temporary_path(tmp_path / "meta.json")
    assert made.exists() and is_temporary(made.name)
    assert is_temporary(".pristine_X.npy.ab_12xyz.tmp")
    assert not is_temporary(".notes.tmp")
    assert not is_temporary(".draft.v2.tmp")
    assert not is_temporary("notes.abcd1234.tmp")


def test_a_folder_whose_name_begins_with_anothers_is_not_inside_it(tmp_path):
    """`noisy2/c.parquet` was taken to lie inside `noisy`: its path begins with the same letters."""
    for name in ("noisy", "noisy2"):
        (tmp_path / name).mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "noisy")
    assert not inside(tmp_path / "noisy2" / "c.parquet", tmp_path / "noisy")
    assert not inside(tmp_path / "noisy2", tmp_path / "noisy")
    assert inside(tmp_path / "noisy" / "c.parquet", tmp_path / "noisy")
    assert inside(tmp_path / "noisy", tmp_path / "noisy")
    assert inside(tmp_path / "link" / "c.parquet", tmp_path / "noisy")  # however spelt
    assert inside(Path(os.path.relpath(tmp_path / "noisy" / "c.parquet")), f"{tmp_path / 'noisy'}{os.sep}")
