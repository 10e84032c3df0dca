"""dmhpc/files.py: the names of its temporary files and where a path lies, on real files and folders
(atomic writes and locks are tested where they are used: test_run.py, test_prepare.py, test_synth.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmhpc.errors import DmhpcError
from dmhpc.files import hold_lock, inside, is_temporary, temporary_path


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


def test_only_the_orphans_of_the_files_named_are_removed(tmp_path):
    """`of` limits the clean-up to the killed writes of those files: a catalog's, beside another
    process's write under way."""
    from dmhpc.files import remove_orphans

    mine = tmp_path / ".cat.csv.ab12cd34.tmp"
    theirs = tmp_path / ".other.csv.ef56gh78.tmp"
    mine.write_bytes(b"x" * 10)
    theirs.write_bytes(b"y" * 20)
    assert remove_orphans(tmp_path, of=("cat.csv",)) == (1, 10)
    assert os.listdir(tmp_path) == [theirs.name]


def test_a_temporary_name_has_exactly_tempfiles_eight_random_characters():
    """mkstemp's random part is 8 characters: a user's `.notes.backup1.tmp` (7) is not an orphan."""
    assert not is_temporary(".notes.backup1.tmp")
    assert not is_temporary(".notes.backup123.tmp")
    assert is_temporary(".notes.backup12.tmp")


def test_same_place_sees_through_symlinks(tmp_path):
    """A source and target given as a folder and a symlink to it are one data set."""
    from dmhpc.files import same_place

    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    assert same_place(tmp_path / "link", tmp_path / "data")
    assert same_place(tmp_path / "data" / ".." / "data", tmp_path / "data")
    assert not same_place(tmp_path / "data", tmp_path)


def test_a_lock_in_a_folder_that_refuses_new_files_says_why():
    """/proc exists and refuses new files with ENOENT: the lock retried 100 times and said that its
    folder "keeps vanishing"."""
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(DmhpcError) as info:
        hold_lock(Path("/proc/dmhpc-x.lock"), "held by {holder}", "a second one")
    assert str(info.value) == "/proc/dmhpc-x.lock: cannot create the lock: No such file or directory"


def test_where_the_file_system_refuses_locks_a_live_writers_temporary_file_is_left(tmp_path, monkeypatch, capsys):
    """On a mount that refuses flock the lock is taken unguarded (with a warning): an evaluation's
    start beside a training run removed the trainer's checkpoint in progress as an orphan, and the
    save failed. A temporary file of the last minutes is now left; an older one is still removed."""
    import errno
    import time

    from dmhpc import files

    def refused(handle, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(files, "_locks_refused", False)  # (this process's flag, put back after the test)
    monkeypatch.setattr(files.fcntl, "flock", refused)
    with hold_lock(tmp_path / ".lock", "in use by {holder}", "trainer"):
        assert "the file system refuses locks (No locks available); a second trainer would not be detected" in \
            capsys.readouterr().out
        live, old = temporary_path(tmp_path / "last.pt"), temporary_path(tmp_path / "best.pt")
        for path in (live, old):
            path.write_bytes(b"part of a checkpoint")
        os.utime(old, (time.time() - 2 * files.LIVE_WRITE_S,) * 2)
        assert files.remove_orphans(tmp_path) == (1, 20)
        assert live.exists() and not old.exists()


def test_a_lock_that_fails_otherwise_than_refused_is_an_error_not_an_unguarded_run(tmp_path, monkeypatch):
    """Any error of flock was taken for a file system without locks: an I/O error or a stale NFS
    handle went on unguarded for the whole run, with a warning."""
    import errno

    from dmhpc import files

    def failing(handle, how):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "_locks_refused", False)
    monkeypatch.setattr(files.fcntl, "flock", failing)
    with pytest.raises(DmhpcError, match=r"\.lock: cannot take the lock: Input/output error$"):
        hold_lock(tmp_path / ".lock", "in use by {holder}", "trainer")
    assert files._locks_refused is False


def test_a_lock_looked_at_just_then_is_taken_not_refused(tmp_path, monkeypatch):
    """`lock_holder` looks by taking a shared lock for an instant: a trainer starting at that instant
    was refused a free lock, "in use by another process"."""
    import fcntl

    from dmhpc import files

    path = tmp_path / ".lock"
    with open(path, "a+") as looker:
        fcntl.flock(looker, fcntl.LOCK_SH)  # what lock_holder holds while it reads
        # The look ends while the trainer waits to try again.
        monkeypatch.setattr(files.time, "sleep", lambda seconds: fcntl.flock(looker, fcntl.LOCK_UN))
        handle = hold_lock(path, "held by {holder}", "trainer")
        monkeypatch.undo()
    handle.close()
    with open(path, "a+") as holder:  # one that stays is still refused
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(DmhpcError, match="held by"):
            hold_lock(path, "held by {holder}", "trainer")


def test_a_writer_starting_while_another_gives_its_folder_lock_back_is_the_only_one_there(tmp_path, monkeypatch):
    """A folder's lock file must go before its lock (dmhpc prepare, synth, export, explain): released
    first, a writer starting in between locked that file and lost it with its unlinking, and a
    third then wrote in the folder beside the second."""
    import contextlib

    from dmhpc import files

    folder, held = tmp_path / "ds", contextlib.ExitStack()
    real = files.hold_lock

    class StartsBetween:  # the second writer starts the moment the first unlocks
        def __init__(self, handle):
            self.handle = handle

        def close(self):
            self.handle.close()
            monkeypatch.setattr(files, "hold_lock", real)
            held.enter_context(files.locked_directory(folder, "dmhpc prepare"))

    monkeypatch.setattr(files, "hold_lock", lambda *a, **k: StartsBetween(real(*a, **k)))
    with held:
        with files.locked_directory(folder, "dmhpc prepare"):
            pass
        with pytest.raises(DmhpcError, match=f"{folder}: in use by another dmhpc prepare"):
            with files.locked_directory(folder, "dmhpc prepare"):
                pass
