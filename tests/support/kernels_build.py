"""The kernels' ahead-of-time build that tests/integration/test_kernels.py checks, and the
kernels' unit tests run on it, started as soon as collection is over when a selected test needs
them (tests/integration/conftest.py), so that they run on the second core while the tests before
test_kernels.py run.

The build is one ``footfall-agent build-kernels`` of about 20 s of CPU (43 to 52 s of wall time
at load 8, measured in issue 19's speed work), then a pytest run of about 9 s, that nothing
else in the session waits for until test_kernels.py: started there, they ran alone on one core
of two; started early, they overlap the aggregator's tests (at load 4 to 5 the build's wait fell
from 21 s to 10 s with only tests/aggregator/test_ingest.py before it). A stale build lies in
its directory beforehand, which the build must replace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.shared import REPO

AGENT = Path(sys.executable).with_name("footfall-agent")
STALE = "footfall_kernels_0000000000000000.cpython-311-x86_64-linux-gnu.so"
FIXTURES = ("aot_dir", "aot_unit_tests")  # test_kernels.py's: the build, the tests on it
TIMEOUT_S = 600

# The kernels' own unit tests, run again on the build (test_kernels.py).
UNIT_TESTS = (
    "tests/agent/test_anonymize.py",
    "tests/agent/test_live.py",
    "tests/agent/test_count.py",
)


@dataclass
class _Background:
    """The build, then (if it succeeded) :data:`UNIT_TESTS` on it, in a thread of the session."""

    directory: Path
    with_tests: bool
    thread: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)
    running: subprocess.Popen[str] | None = None
    done: list[subprocess.CompletedProcess[str]] = field(default_factory=list)  # build, tests

    def _step(self, *command: str) -> subprocess.CompletedProcess[str]:
        self.running = subprocess.Popen(
            command, env=env(self.directory), cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = self.running.communicate()
        finished = subprocess.CompletedProcess(command, self.running.returncode, out, err)
        self.done.append(finished)
        return finished

    def run(self) -> None:
        built = self._step(str(AGENT), "build-kernels").returncode == 0
        if built and self.with_tests and not self.stopping.is_set():
            self._step(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UNIT_TESTS)

    def wait(self, steps: int) -> list[subprocess.CompletedProcess[str]]:
        """The first ``steps`` steps' results, once they are done (fewer if the build failed)."""
        assert self.thread is not None
        deadline = time.monotonic() + TIMEOUT_S
        while len(self.done) < steps and self.thread.is_alive():
            self.thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
            assert time.monotonic() < deadline, f"the kernels' build ran over {TIMEOUT_S} s"
        return self.done[:steps]


_started: list[_Background] = []  # one per session


def env(kernels_dir: Path) -> dict[str, str]:
    """The agent's environment with its kernels (built or not) in ``kernels_dir``."""
    return os.environ | {"FOOTFALL_KERNELS_DIR": str(kernels_dir), "FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def start(items: Iterable[object] | None = None) -> None:
    """Start the build (and the unit tests on it) in the background, once, if any of ``items``
    (pytest's, after selection) uses :data:`FIXTURES`' first (and second); with no items, both."""
    used = set(FIXTURES) if items is None else set()
    for item in items or ():
        used.update(set(FIXTURES) & set(getattr(item, "fixturenames", ())))
    if _started or not used:
        return
    directory = Path(tempfile.mkdtemp(prefix="footfall-kernels-"))
    background = _Background(directory, with_tests=FIXTURES[1] in used)
    (background.directory / STALE).write_bytes(b"an older build")
    background.thread = threading.Thread(target=background.run, name="kernels-build", daemon=True)
    background.thread.start()
    _started.append(background)


def built() -> Path:
    """The build's directory once it has finished (started now if it was not); fails with
    its error output if it did not succeed."""
    start()
    (background,) = _started
    (build,) = background.wait(1)
    assert build.returncode == 0, build.stderr
    assert build.stdout.startswith(f"built {background.directory}/footfall_kernels_"), build.stdout
    return background.directory


def unit_tests() -> subprocess.CompletedProcess[str]:
    """pytest's run of :data:`UNIT_TESTS` on the build (after :func:`built`)."""
    (background,) = _started
    return background.wait(2)[1]


def stop() -> None:
    """The end of the session: what still runs killed, the build's directory removed."""
    for background in _started:
        background.stopping.set()
        if background.running is not None and background.running.poll() is None:
            background.running.kill()
        if background.thread is not None:
            background.thread.join(10)
        shutil.rmtree(background.directory, ignore_errors=True)
