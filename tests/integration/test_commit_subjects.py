"""``scripts/check-commits``: commit subjects under 72 characters (issue 19), in a repository of
its own made here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.shared import REPO


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_a_long_subject_fails_with_its_commit_and_length(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "check-commits"
    shutil.copy2(REPO / "scripts" / "check-commits", script)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "Base")
    base = _git(tmp_path, "rev-parse", "--short", "HEAD")
    fine = "x" * 71
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", fine, "-m", "Detail " * 40)

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], capture_output=True, text=True, check=False)

    passed = check(f"{base}..HEAD")
    assert passed.returncode == 0, passed.stderr
    _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "µ" * 72)  # characters, not bytes
    long = _git(tmp_path, "rev-parse", "--short", "HEAD")
    failed = check(f"{base}..HEAD")
    assert failed.returncode == 1
    assert f"  {long} {'µ' * 72} (72 characters)\n" in failed.stderr
    assert fine not in failed.stderr
    unknown = check("30f2ce3..HEAD")  # the default's start, absent from a shallow clone
    assert (unknown.returncode, unknown.stdout) == (
        0, "scripts/check-commits: 30f2ce3 is not in this clone (shallow?): not checked\n"
    )  # fmt: skip
