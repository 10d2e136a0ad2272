"""No frame is read out of its bounds by the parser's numba kernels: every generated and real
frame parsed under NUMBA_BOUNDSCHECK=1 next to guard pages (a fresh compile in a subprocess).
Here rather than in the agent's fast layer: the compile and the 10,000 generated frames plus every
frame of the shared captures take about 7 s alone and 25 s on a busy machine; the parser's other
bounds tests (a buffer of poison around each frame) stay in tests/agent/test_parse.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.agent.test_parse import ALL_LINKS, random_frames, shared_frames
from tests.support.shared import REPO

# Run in a subprocess (NUMBA_BOUNDSCHECK=1, empty NUMBA_CACHE_DIR): argv[1] is a progress file,
# stdin names the frames (.npz) and optionally "PHASE FIRST LAST" to parse those frames alone.
# Phase 1 parses every frame alone in an array that is a view of exactly its bytes, ending
# where a PROT_NONE page begins: numba's bounds check raises IndexError for an index past the
# end, and any other read past it (the parser's raw unaligned loads, which no bounds check
# sees) dies with SIGSEGV. Phase 2 puts frames right after a PROT_NONE page, in batches: a
# read before a frame's first byte dies too. The progress file says where it happened.
BOUNDS_SCRIPT = textwrap.dedent(
    """
    import ctypes
    import mmap
    import sys

    import numpy as np
    from numba import njit

    from firmware_agent.stages.batch import FrameBatch
    from firmware_agent.stages.parse import parse_batch

    PAGE = mmap.PAGESIZE
    progress = np.memmap(sys.argv[1], np.int64, "r+", shape=(3,)).view(np.ndarray)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    keep = []


    @njit
    def read(a, i):
        return a[i]


    try:
        read(np.zeros(1, np.uint8), 1)
    except IndexError:
        pass
    else:
        sys.exit("NUMBA_BOUNDSCHECK=1 is not in effect")


    def guarded(slots, slot_pages):  # slots regions of slot_pages pages between PROT_NONE ones
        stride = (slot_pages + 1) * PAGE
        region = mmap.mmap(-1, slots * stride + PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        for k in range(slots + 1):
            if libc.mprotect(base + k * stride, PAGE, 0) != 0:  # PROT_NONE
                sys.exit("mprotect failed")
        keep.append(region)
        return np.frombuffer(region, np.uint8), stride


    def parse(memory, starts, sizes, link_types):
        ts = np.zeros(len(starts), np.int64)
        return parse_batch(FrameBatch(memory, starts, sizes, ts, link_types))


    zero = np.zeros(1, np.int64)
    parse(np.zeros(1, np.uint8), zero, np.ones(1, np.int32), np.full(1, 105, np.uint16))  # compile
    path, *narrow = sys.stdin.readline().split()
    saved = np.load(path)
    data, offsets, links = saved["data"], saved["offsets"], saved["links"]
    lengths = saved["lengths"].astype(np.int32)
    slot_pages = max(1, -(-int(lengths.max(initial=1)) // PAGE))
    if narrow:
        phase, first, last = map(int, narrow)
        rows = range(first, last + 1)
    else:
        phase, rows = 1, range(len(offsets))
    memory, stride = guarded(1, slot_pages)
    progress[0] = phase
    for i in rows:  # each frame alone
        progress[1] = progress[2] = i
        size = int(lengths[i])
        start = stride - size if phase == 1 else PAGE
        memory[start : start + size] = data[offsets[i] : offsets[i] + size]
        try:
            if phase == 1:  # an array of exactly its bytes, ending at a PROT_NONE page
                parse(memory[start : start + size], zero, lengths[i : i + 1], links[i : i + 1])
            else:  # at the start of a page after a PROT_NONE one, both in the array
                parse(memory, zero + start, lengths[i : i + 1], links[i : i + 1])
        except IndexError as err:
            print(f"frame {i}: IndexError: {err}")
            sys.exit(3)
    if not narrow:  # phase 2 in batches: every frame right after a PROT_NONE page
        chunk = max(1, (64 << 20) // stride)
        memory, stride = guarded(chunk, slot_pages)
        for first in range(0, len(offsets), chunk):
            rows = np.arange(first, min(first + chunk, len(offsets)))
            progress[:] = (2, rows[0], rows[-1])
            starts = np.arange(len(rows), dtype=np.int64) * stride + PAGE
            for start, i in zip(starts, rows):
                memory[start : start + lengths[i]] = data[offsets[i] : offsets[i] + lengths[i]]
            parse(memory, starts, lengths[rows], links[rows])
    print(f"parsed {len(offsets)} frames")
    """
)


def run_bounds_script(npz: Path, progress: Path, narrow: str = "") -> tuple[int, str, str]:
    """(return code, stdout, stderr) of BOUNDS_SCRIPT over the frames saved in npz."""
    np.memmap(progress, np.int64, "w+", shape=(3,)).flush()
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(npz.parent / "numba"))
    env.pop("NUMBA_DISABLE_JIT", None)
    checker = subprocess.Popen(
        [sys.executable, "-c", BOUNDS_SCRIPT, str(progress)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = checker.communicate(f"{npz} {narrow}\n", timeout=600)
    finally:
        checker.kill()
    return checker.returncode, out, err


def test_no_frame_is_read_out_of_bounds_under_numba_boundscheck_and_guard_pages(
    tmp_path: Path,
) -> None:
    """Every generated and real frame alone, its bytes ending (then starting) at a guard page.

    A fresh compile with NUMBA_BOUNDSCHECK=1 in a subprocess (BOUNDS_SCRIPT): an index past
    a frame's end raises IndexError; a raw load past either end dies with SIGSEGV. Without
    ../shared only generated frames run.
    """
    fuzz = [frame for seed in range(4) for frame in random_frames(seed, ALL_LINKS, 2500)]
    real = shared_frames()
    frames = fuzz + [frame for _, _, frame in real]
    lengths = np.array([len(frame) for frame, _ in frames], np.int64)
    npz, progress = tmp_path / "frames.npz", tmp_path / "progress"
    np.savez(
        npz,
        data=np.frombuffer(b"".join(frame for frame, _ in frames), np.uint8),
        offsets=np.concatenate(([0], np.cumsum(lengths)[:-1])),
        lengths=lengths,
        links=np.array([link for _, link in frames], np.uint16),
    )
    code, out, err = run_bounds_script(npz, progress)
    if code == 0:
        assert out.strip() == f"parsed {len(frames)} frames"
        return
    phase, first, last = (int(v) for v in np.memmap(progress, np.int64, "r", shape=(3,)))
    if code < 0 and first != last:  # died inside a batch: parse its frames alone to find which
        code, out, err = run_bounds_script(npz, progress, f"{phase} {first} {last}")
        phase, first, last = (int(v) for v in np.memmap(progress, np.int64, "r", shape=(3,)))
    assert code in (3, -11, -7), f"bounds checker failed ({code}): {err[-3000:]}"
    if first < len(fuzz):  # generated frames in hex, real ones by place only
        frame, link = fuzz[first]
        where = f"generated frame {first}, link type {link}: {frame.hex()}"
    else:
        name, number, (_, link) = real[first - len(fuzz)]
        where = f"{name} frame {number}, link type {link}"
    side = "past its end" if phase == 1 else "before its start"
    how = out.strip() if code == 3 else f"killed by signal {-code}: a read {side}"
    pytest.fail(f"out-of-bounds read: {where}: {how}")


# --- real captures ------------------------------------------------------------------------
