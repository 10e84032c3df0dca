"""The suite's own guard: the whole suite starts only where its files fit."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, SUITE_DISK_GB, clean_env


def test_the_whole_suite_on_a_disk_too_small_is_one_line_and_a_selection_runs(small_disk):
    """A shared disk that filled up failed a CI run at a quarter of the suite, in 518 errors of
    "No space left on device" over 15 minutes. The whole suite now stops at once, saying where; a
    selection (-k, -m, paths) is not held to the whole suite's need."""
    disk = small_disk(50)
    pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", "--basetemp", str(disk / "bt")]
    proc = subprocess.run(pytest, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == (f"Exit: {disk}: 0.1 GB free, and the suite writes up to {SUITE_DISK_GB:.0f} GB there; "
                           f"free some, or give TMPDIR (or --basetemp) another disk\n")
    assert not (disk / "bt").exists()
    proc = subprocess.run([*pytest, "-q", "tests/test_files.py", "-k", "orphans"], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout + proc.stderr
