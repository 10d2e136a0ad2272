"""The agent's numba kernels, compiled ahead of time when a matching build exists.

Every kernel is an ordinary Python function decorated with :func:`kernel` in its stage's
module (capture, parse, anonymize, count, estimate, people, table, live). It is compiled one of two
ways, from that one definition:

* ahead of time (AOT): ``footfall-agent build-kernels`` compiles every entry point (the
  kernels Python calls; they name their ``export`` signature) with ``numba.pycc`` into one
  extension module, ``footfall_kernels_<hash>`` in :func:`kernels_dir`. ``<hash>`` digests
  the kernel modules' sources and the numba, llvmlite and numpy versions, so a build is used
  only by the exact sources it was compiled from. When it is present the decorated names
  are the extension's functions, and neither numba nor llvmlite is imported: the agent
  takes about 110 MB less (bench/bench_live.py).
* just in time (JIT), otherwise: :func:`kernel` is ``numba.njit(cache=True)``, as before.
  A build from other sources (a stale one) is ignored, with a warning.

``FOOTFALL_KERNELS_DIR`` sets the directory; the default is ``lib/footfall-kernels`` under
the Python environment (``/opt/footfall/lib/footfall-kernels`` on an access point:
read-only to the agent, written by ``hardware/install.sh``). Differences of the AOT build:
pycc's entry points hold the GIL (the JIT's are ``nogil``), and they take arrays of any
layout where the JIT specialises on contiguous ones.

Why ``numba.pycc`` although numba marks it for deprecation (decided in issue 19): numba's
deprecation notices ("Deprecation of the numba.pycc module", numba's
docs/source/reference/deprecation.rst) give no removal version. Pending-deprecation warnings
since 0.57; real deprecation warnings only once the replacement exists (none has shipped:
0.68.1, the newest release in October 2026, still warns "pending"); then at least two
releases of those before removal. So pycc cannot disappear before 0.71, and ``pyproject.toml``
pins ``numba<0.71``. The build ignores only the *pending* warning: a real deprecation warning
reaches whoever builds, and ``tests/integration/test_kernels.py`` fails on it (two releases
left: move the build then) and checks that the installed numba is inside the pin.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from firmware_agent.contract.errors import AgentError

__all__ = [
    "AOT",
    "KERNEL_MODULES",
    "KernelBuildError",
    "build",
    "compiler_module",
    "kernel",
    "kernels_dir",
    "source_hash",
]

log = logging.getLogger("footfall.agent")

F = TypeVar("F", bound=Callable[..., Any])

# The modules defining kernels (below firmware_agent); their sources make the build's hash, and
# pycc compiles their entry points in this order (parse's first: see kernel()).
KERNEL_MODULES = (
    "stages.parse",
    "kernels.intrinsics",
    "kernels.table",
    "stages.capture",
    "stages.anonymize",
    "stages.count",
    "stages.estimate",
    "stages.people",
    "stages.live",
)
_PREFIX = "footfall_kernels_"


def kernels_dir() -> Path:
    """Where the AOT build lives (``FOOTFALL_KERNELS_DIR``, or the environment's lib/)."""
    configured = os.environ.get("FOOTFALL_KERNELS_DIR")
    return Path(configured) if configured else Path(sys.prefix) / "lib" / "footfall-kernels"


def source_hash() -> str:
    """Digest of everything the compiled kernels depend on: sources and compiler versions."""
    digest = hashlib.sha256()
    root = Path(__file__).parent.parent
    for name in (*KERNEL_MODULES, "kernels.__init__"):
        digest.update((root / f"{name.replace('.', '/')}.py").read_bytes())
    for package in ("numba", "llvmlite", "numpy"):
        digest.update(f"{package}={importlib.metadata.version(package)};".encode())
    return digest.hexdigest()[:16]


def _module_name() -> str:
    return _PREFIX + source_hash()


def _load_aot() -> types.ModuleType | None:
    """The matching build's extension module, or None (a stale one is named in a warning)."""
    directory = kernels_dir()
    name = _module_name()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{name}{suffix}"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:  # not for a file with an extension suffix
                raise ImportError(f"cannot load the kernels' build {path}", path=str(path))
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    for stale in sorted(directory.glob(_PREFIX + "*")):
        log.warning(
            "ignoring the kernels' ahead-of-time build %s: it was compiled from other sources "
            "or numba/numpy versions (this build is %s); compiling with numba's JIT instead "
            "(footfall-agent build-kernels rebuilds it)",
            stale,
            name,
        )
    return None


AOT = _load_aot()
"""The ahead-of-time build in use, or None: the kernels are numba's JIT."""


class KernelBuildError(AgentError):
    """The ahead-of-time build cannot be made here (no setuptools, no C compiler)."""


@dataclass(frozen=True)
class _Export:
    name: str
    signature: str
    function: Callable[..., Any]


_EXPORTS: list[_Export] = []


def kernel(
    *, export: str | None = None, inline: bool = False, gil: bool = False
) -> Callable[[F], F]:
    """A numba kernel. ``export``: its signature (numba's syntax) if Python calls it, which
    makes it an entry point of the AOT build; ``inline``: inlined into its callers."""

    def decorate(function: F) -> F:
        module = function.__module__.removeprefix("firmware_agent.")
        # pycc compiles in the order of these names: KERNEL_MODULES's. parse's _parse comes
        # first: compiled after other kernels in the same pycc module, it fails to type ("No
        # conversion from Literal[int](2) to Literal[int](0) for 'k'").
        name = f"k{KERNEL_MODULES.index(module)}_{module.rsplit('.', 1)[-1]}_{function.__name__}"
        if AOT is not None:
            return getattr(AOT, name) if export else function
        from numba import njit  # noqa: PLC0415 (not under the AOT build)

        if export:
            _EXPORTS.append(_Export(name, export, function))
        if inline:
            return cast(F, njit(cache=True, inline="always")(function))
        return cast(F, njit(cache=True, nogil=not gil)(function))

    return decorate


def compiler_module(name: str) -> types.ModuleType:
    """Module ``name`` where kernels are compiled (it imports numba); an empty stand-in under
    the AOT build, whose kernels never run as Python."""
    return types.ModuleType(name) if AOT is not None else importlib.import_module(name)


def build(target_cpu: str = "host") -> tuple[Path, bool]:
    """Compile every entry point into the AOT build in :func:`kernels_dir`.

    Returns (the extension's path, whether it was built now). Idempotent: a build matching the
    sources is kept; stale builds are removed once the new one is in place.
    """
    directory = kernels_dir()
    name = _module_name()
    if AOT is not None:
        return Path(str(AOT.__file__)), False
    for module in KERNEL_MODULES:
        importlib.import_module(f"firmware_agent.{module}")
    from numba.core.errors import NumbaPendingDeprecationWarning  # noqa: PLC0415 (only to build)

    with warnings.catch_warnings():  # pending only: see the module's docstring
        warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)
        try:
            from numba.pycc.cc import CC  # noqa: PLC0415 (only to build)
        except ImportError as exc:  # numba.pycc builds the extension with setuptools
            raise KernelBuildError(
                f"the ahead-of-time build needs numba.pycc and setuptools ({exc}); "
                f"{sys.prefix}/bin/pip install setuptools"
            ) from exc

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as work:
        try:
            cc = CC(name)  # type: ignore[no-untyped-call]  # finds the C compiler
            cc.output_dir = work
            cc.target_cpu = target_cpu
            cc.verbose = False
            for entry in _EXPORTS:
                cc.export(entry.name, entry.signature)(entry.function)  # type: ignore[no-untyped-call]
            cc.compile()
        except Exception as exc:  # no C compiler (RuntimeError), setuptools' compile errors
            first = str(exc).splitlines()[0]
            raise KernelBuildError(
                f"compiling the kernels' extension failed ({first}): it needs a C compiler and "
                "Python's headers (apt-get install gcc python3-dev)"
            ) from exc
        (built,) = Path(work).glob(f"{name}*")
        path = directory / built.name
        os.replace(built, path)
    for stale in directory.glob(_PREFIX + "*"):
        if not stale.name.startswith(name):
            stale.unlink()
    return path, True
