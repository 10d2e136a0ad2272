"""The kernels' ahead-of-time build that tests/integration/test_kernels.py checks, started as soon
as collection is over when a selected test needs it (tests/integration/conftest.py), so that it
compiles on the second core while the tests before it run.

The build is one ``footfall-agent build-kernels`` of about 20 s of CPU (43 to 52 s of wall time
at load 8, measured in issue 19's speed work) that nothing else in the session waits for until
test_kernels.py: started in the fixture, it ran alone on one core of two; started early, it
overlaps the aggregator's tests. A stale build lies in its directory beforehand, which it must
replace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

AGENT = Path(sys.executable).with_name("footfall-agent")
STALE = "footfall_kernels_0000000000000000.cpython-311-x86_64-linux-gnu.so"
FIXTURE = "aot_dir"  # the fixture that takes the build (test_kernels.py)
TIMEOUT_S = 600

_started: list[tuple[Path, subprocess.Popen[str]]] = []  # one build per session


def env(kernels_dir: Path) -> dict[str, str]:
    """The agent's environment with its kernels (built or not) in ``kernels_dir``."""
    return os.environ | {"FOOTFALL_KERNELS_DIR": str(kernels_dir), "FOOTFALL_EPOCH_TIMEZONE": "UTC"}


def start(items: Iterable[object] = ()) -> None:
    """Start the build in the background, once, if any of ``items`` (pytest's, after
    selection) uses :data:`FIXTURE`; with no items, unconditionally."""
    wanted = not items or any(FIXTURE in getattr(item, "fixturenames", ()) for item in items)
    if _started or not wanted:
        return
    directory = Path(tempfile.mkdtemp(prefix="footfall-kernels-"))
    (directory / STALE).write_bytes(b"an older build")
    process = subprocess.Popen(
        [str(AGENT), "build-kernels"],
        env=env(directory),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _started.append((directory, process))


def built() -> Path:
    """The build's directory once it has finished (started now if it was not); fails with
    its error output if it did not succeed."""
    start()
    ((directory, process),) = _started
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err
    assert out.startswith(f"built {directory}/footfall_kernels_"), out
    return directory


def stop() -> None:
    """The end of the session: the build stopped if it still runs, its directory removed."""
    for directory, process in _started:
        if process.poll() is None:
            process.kill()
            process.communicate()
        shutil.rmtree(directory, ignore_errors=True)
