"""The kernels compiled ahead of time (``footfall-agent build-kernels``) against numba's JIT.

One build per session (about 20 s of CPU), started in the background as soon as collection is
over (tests/support/kernels_build.py). Each mode runs in a process of its own
(the choice is made when :mod:`firmware_agent.kernels` is imported): the shared captures'
``replay`` and ``inspect`` output is byte for byte the same, the AOT process never imports
numba, a stale build is ignored with a warning, and the kernels' own unit tests pass on the
AOT build too. And the numba pin that keeps ``numba.pycc`` holds.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.support import kernels_build
from tests.support.kernels_build import AGENT, STALE, env
from tests.support.shared import REPO

# Replays and inspects every capture given, then says which compiler modules were loaded.
SCRIPT = """
import sys
from firmware_agent import cli, kernels
for path in sys.argv[1:]:
    print("replay", path, cli.main(["replay", path]), flush=True)
print("inspect", cli.main(["inspect", *sys.argv[1:]]), flush=True)
print("aot", kernels.AOT is not None)
print("numba", sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "llvmlite"))[:1])
"""


def _run(kernels_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env(kernels_dir), capture_output=True, text=True, check=False, cwd=REPO
    )


@pytest.fixture(scope="session")
def aot_dir() -> Path:
    """The session's build: started once collection was over (tests/support/kernels_build.py),
    over a stale one."""
    return kernels_build.built()


@pytest.fixture(scope="session")
def aot_unit_tests(aot_dir: Path) -> subprocess.CompletedProcess[str]:
    """pytest's run of the kernels' unit tests (kernels_build.UNIT_TESTS: anonymize, live,
    count) on the build, started in the background as soon as the build was done."""
    return kernels_build.unit_tests()


@pytest.mark.slow  # the AOT build (aot_dir): about a minute
def test_the_build_replaces_a_stale_one_and_a_second_run_changes_nothing(aot_dir: Path) -> None:
    (path,) = aot_dir.iterdir()
    assert path.name.startswith("footfall_kernels_") and path.name != STALE
    before = path.stat()
    again = _run(aot_dir, str(AGENT), "build-kernels")
    assert (again.returncode, again.stdout) == (0, f"up to date: {path}\n")
    assert path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.slow  # the AOT build (aot_dir): about a minute
def test_aot_and_jit_give_the_same_bytes_on_the_shared_captures_without_numba(
    aot_dir: Path, pcaps_dir: Path, tmp_path: Path
) -> None:
    captures = sorted(str(p) for p in pcaps_dir.iterdir() if not p.name.endswith(".csv"))
    with ThreadPoolExecutor(1) as pool:  # the two at once, a core each (half the wall time)
        started = pool.submit(_run, aot_dir, sys.executable, "-c", SCRIPT, *captures)
        jit = _run(tmp_path, sys.executable, "-c", SCRIPT, *captures)
        aot = started.result()
    assert aot.stdout.splitlines()[-2:] == ["aot True", "numba []"], aot.stderr
    assert jit.stdout.splitlines()[-2:] == ["aot False", "numba ['llvmlite']"], jit.stderr
    assert aot.stdout.splitlines()[:-2] == jit.stdout.splitlines()[:-2]
    assert aot.stdout.count('"window_start"') > 100  # windows were counted, not just errors


def test_a_stale_build_is_ignored_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / STALE).write_bytes(b"compiled from other sources")
    code = "from firmware_agent import kernels; print(kernels.AOT)"
    result = _run(tmp_path, sys.executable, "-c", code)
    assert result.stdout == "None\n", result.stderr
    assert f"ignoring the kernels' ahead-of-time build {tmp_path / STALE}" in result.stderr
    assert "compiling with numba's JIT instead" in result.stderr


@pytest.mark.slow  # the AOT build (aot_dir): about a minute
def test_the_kernels_unit_tests_pass_on_the_aot_build(
    aot_unit_tests: subprocess.CompletedProcess[str],
) -> None:
    assert aot_unit_tests.returncode == 0, aot_unit_tests.stdout[-3000:]


def test_a_build_without_a_c_compiler_says_what_it_needs(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(AGENT), "build-kernels"],
        env=env(tmp_path) | {"CC": "/bin/false"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "footfall-agent: error: compiling the kernels' extension failed" in result.stderr
    assert "apt-get install gcc python3-dev" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing half-built is left


@pytest.mark.slow  # the AOT build (aot_dir): about a minute
def test_doctor_under_the_aot_build_replays_without_numba(aot_dir: Path) -> None:
    code = (
        "import sys\n"
        "from firmware_agent import settings\nfrom firmware_agent.tools import doctor\n"
        "config = settings.load_config(None, environ={'FOOTFALL_EPOCH_TIMEZONE': 'UTC'})\n"
        "finding = doctor.check_numba_cache(config)\n"
        "print(finding.status, finding.detail)\n"
        "print('numba' in sys.modules)\n"
    )
    result = _run(aot_dir, sys.executable, "-c", code)
    status, numba_loaded = result.stdout.splitlines()
    assert status.startswith(f"ok not needed: kernels compiled ahead of time ({aot_dir}/"), status
    assert numba_loaded == "False"


def test_numba_is_inside_its_pin_and_pycc_is_not_yet_deprecated() -> None:
    """numba removes pycc no sooner than two releases after it first warns of deprecation (not
    "pending deprecation"): the reasons for the pin are in firmware_agent/kernels' docstring."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (numba,) = (r for r in map(Requirement, project["dependencies"]) if r.name == "numba")
    installed = importlib.metadata.version("numba")
    assert numba.specifier.contains(installed), f"numba {installed} is outside {numba}"
    pycc = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", "import numba.pycc"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert pycc.returncode == 0, (
        f"numba {installed} deprecates pycc (or lost it): at most two releases before removal;"
        f" move the AOT build off numba.pycc or lower the pin below it\n{pycc.stderr}"
    )
