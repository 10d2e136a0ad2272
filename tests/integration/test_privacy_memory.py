"""No raw frame stays in a running agent's memory, whatever its source (issue 17).

A child process reads a capture the way ``footfall-agent run`` does (the service's source:
an unbuffered file, standard input below its buffer, gzip through a ``gzip -dc`` child; the
pipeline parsing a batch ahead in its second thread, then hashing and counting), and stops
itself (SIGSTOP) at the points where the parent reads its writable memory (heap, stacks,
anonymous mappings: ``/proc/PID/mem``) and searches it for every address and every non-empty
SSID of the capture:

* **mid-stream** (standard input only): half of the capture has been written, whole records,
  and the agent has taken it all in, while the pipe stays open;
* **at the source's end**: every frame read, parsed, hashed and counted; the key, the tables
  and the last windows still open, the reader not yet closed;
* **after the run**: windows closed, key wiped, reader closed; the process still alive.

Found: nothing, in any of them. (Parsed rows waiting in the read-ahead queue to be hashed hold
their addresses for that moment: the one batch the design allows; none is waiting at these
points.)
"""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_agent.cli import BUNDLED_SAMPLE
from firmware_agent.stages.capture import CaptureReader
from tests.agent.test_privacy import RECORD_KEYS_CHILD, _secrets_of, u64_hits
from tests.support.agent_harness import prepare_agent, scrape, unique_id
from tests.support.mqtt_broker import wait_for
from tests.support.ports import free_port
from tests.support.shared import shared_capture_names, shared_path

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    from firmware_agent.stages.capture import read_ahead
    from firmware_agent.stages.pipeline import Pipeline, parse_frames
    from firmware_agent.service.run import _open_source
    from firmware_agent.settings import load_config

    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC",
                                       "FOOTFALL_SOURCE_PATH": sys.argv[1],
                                       "FOOTFALL_SOURCE_SPEED": "fast"})
    pipeline = Pipeline(config)
    with _open_source(config, threading.Event()) as reader:
        for probes in read_ahead(map(parse_frames, reader)):
            for window in pipeline.count(probes):
                config.privacy.release(window)
        os.kill(os.getpid(), signal.SIGSTOP)  # the source's end: all read, the run goes on
        for window in pipeline.finish():
            config.privacy.release(window)
    os.kill(os.getpid(), signal.SIGSTOP)  # after the run
    """
)


def found(blobs: Iterable[bytes], needles: set[bytes]) -> set[bytes]:
    """The needles (4 bytes or longer) that occur in any blob: a sieve on each needle's first
    two bytes, then on its first four (numpy), then a comparison of the rest."""
    rare = {n for n in needles if n[:2] == b"\0\0"}  # a sieve on zeros would pass everything
    sieved = needles - rare
    table = np.zeros(1 << 16, bool)
    table[[int.from_bytes(n[:2], "little") for n in sieved]] = True
    heads = np.unique(np.array([int.from_bytes(n[:4], "little") for n in sieved], np.uint32))
    by_head: dict[bytes, list[bytes]] = {}
    for n in sieved:
        by_head.setdefault(n[:4], []).append(n)
    longest = max((len(n) for n in needles), default=0)
    hits: set[bytes] = set()
    for blob in blobs:
        hits |= {n for n in rare if n in blob}
        for at in range(0, len(blob), 8 << 20):
            chunk = blob[at : at + (8 << 20) + longest]
            data = np.frombuffer(chunk, np.uint8)
            if len(data) < 4:
                continue
            pairs = data[:-1].astype(np.uint16) | (data[1:].astype(np.uint16) << 8)
            where = np.flatnonzero(table[pairs[: len(data) - 3]])
            if not len(where):
                continue
            words = (
                data[where].astype(np.uint32)
                | (data[where + 1].astype(np.uint32) << 8)
                | (data[where + 2].astype(np.uint32) << 16)
                | (data[where + 3].astype(np.uint32) << 24)
            )
            for i in where[np.isin(words, heads)].tolist():
                for n in by_head.get(chunk[i : i + 4], []):
                    if chunk[i : i + len(n)] == n:
                        hits.add(n)
    return hits


def _stopped(child: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise AssertionError(f"the agent ended with status {child.returncode}")
        state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the agent did not stop where it should")


def _scan(child: subprocess.Popen[bytes], secrets: set[bytes]) -> tuple[int, int]:
    hits = found(_memory(child.pid), secrets)
    return sum(len(h) == 6 for h in hits), sum(len(h) != 6 for h in hits)


def _half(capture: bytes) -> int:
    """Where the first half of a pcap's records ends (a record boundary)."""
    big = capture[:4] == b"\xa1\xb2\xc3\xd4"
    pos, records = 24, []
    while pos + 16 <= len(capture):
        records.append(pos)
        pos += 16 + int.from_bytes(capture[pos + 8 : pos + 12], "big" if big else "little")
    return records[len(records) // 2]


SOURCES = ["file", "gzip file", "stdin", "gzip on stdin"]


@pytest.mark.shared
@pytest.mark.parametrize("kind", SOURCES)
def test_a_running_agent_holds_no_address_or_ssid_of_its_source(kind: str, tmp_path: Path) -> None:
    lab = shared_path("data", "lab", "fryza_p1_sc6-61_2022-10-19_anonymized.pcap.gz")
    path = lab if kind.startswith("gzip") else BUNDLED_SAMPLE
    macs, ssids = _secrets_of(path)
    secrets = macs | ssids
    assert len(macs) > 100 and ssids
    stdin = kind.endswith("stdin")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "-" if stdin else str(path)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
    )
    seen: dict[str, tuple[int, int]] = {}
    try:
        if stdin:
            assert child.stdin is not None
            raw = (
                gzip.decompress(path.read_bytes()) if kind.startswith("gzip") else path.read_bytes()
            )
            cut = _half(raw)
            first, rest = raw[:cut], raw[cut:]
            if kind.startswith("gzip"):  # two members: the first ends at a record boundary
                first, rest = gzip.compress(first), gzip.compress(rest)
            child.stdin.write(first)
            child.stdin.flush()
            time.sleep(2)  # the agent takes in what has arrived, then waits on the pipe
            os.kill(child.pid, signal.SIGSTOP)
            _stopped(child)
            seen["mid-stream"] = _scan(child, secrets)
            os.kill(child.pid, signal.SIGCONT)
            child.stdin.write(rest)
            child.stdin.close()
        _stopped(child)
        seen["at the source's end"] = _scan(child, secrets)
        os.kill(child.pid, signal.SIGCONT)
        _stopped(child)
        seen["after the run"] = _scan(child, secrets)
    finally:
        child.kill()
        child.wait()
    assert seen == dict.fromkeys(seen, (0, 0)), f"(addresses, SSIDs) found: {seen}"


@pytest.mark.shared
@pytest.mark.parametrize("kind", ["stdin", "gzip on stdin"])
def test_footfall_agent_run_reading_stdin_holds_no_address_or_ssid(
    kind: str, start_broker: Any, tmp_path: Path
) -> None:
    """The documented ``tcpdump ... | footfall-agent run --source -``, the real service (spool,
    signing, publisher to a broker), stopped once it has counted what it could of the capture
    written to it while the pipe stays open (all of it; through ``gzip -dc``, what gzip has
    let out before its input ends): 0 addresses and 0 SSIDs in its writable memory. gzip
    decompresses nothing until its input buffer (256 KiB) is full or the input ends, so the
    gzipped day (132 KiB) is sent stored (1 MiB): gzip lets out all but its last buffer."""
    path = shared_path("data", "lab", "fryza_p1_sc6-61_2022-10-19_anonymized.pcap.gz")
    path = path if kind.startswith("gzip") else BUNDLED_SAMPLE
    macs, ssids = _secrets_of(path)
    with CaptureReader(path) as reader:
        frames = sum(len(batch.lengths) for batch in reader)
    site, agent = unique_id("s"), "a1"
    broker = start_broker({(site, agent): f"pw-{agent}"})
    port = free_port()
    files = prepare_agent(tmp_path, broker, site, agent, {"metrics.port": port})
    run = files.start("--source", "-", stdin=subprocess.PIPE)
    try:
        assert run.stdin is not None
        raw = path.read_bytes()
        run.stdin.write(gzip.compress(gzip.decompress(raw), 0) if kind.startswith("gzip") else raw)
        run.stdin.flush()

        seen: list[float] = []

        def settled() -> bool:  # most frames counted, and no more for a second
            assert run.poll() is None, files.log_text()
            try:
                seen.append(scrape(port)["footfall_frames_total"])
            except OSError:
                return False
            time.sleep(0.5)
            return seen[-1] >= frames // 2 and seen[-3:] == [seen[-1]] * 3

        wait_for(settled, 60, f"most of the {frames} frames counted (seen {seen[-3:]})")
        assert seen[-1] == frames or kind.startswith("gzip"), (seen[-1], frames)
        os.kill(run.pid, signal.SIGSTOP)
        _stopped(run)
        hits = found(_memory(run.pid), macs | ssids)
        os.kill(run.pid, signal.SIGCONT)
        run.stdin.close()
        assert run.wait(60) == 0, files.log_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert len(macs) > 100 and ssids
    # gzip lets out what it has decompressed wherever that ends: the record it cut waits in
    # the read buffer for its rest, the one batch the design allows (frames count in order).
    in_flight = _record(path, int(seen[-1])) if seen[-1] < frames else b""
    hits = {h for h in hits if h not in in_flight}
    assert (sum(len(h) == 6 for h in hits), sum(len(h) != 6 for h in hits)) == (0, 0)


def _record(path: Path, index: int) -> bytes:
    """The bytes of a capture's record ``index`` (from 0)."""
    with CaptureReader(path) as reader:
        for batch in reader:
            if index < len(batch.lengths):
                at = int(batch.offsets[index])
                return bytes(batch.data[at : at + int(batch.lengths[index])])
            index -= len(batch.lengths)
    raise AssertionError(f"{path} has no record {index}")


_DUMP_CHILD = RECORD_KEYS_CHILD + textwrap.dedent(
    """
    import sys
    from firmware_agent.stages.capture import CaptureReader
    from firmware_agent.contract.errors import NotACaptureError
    from firmware_agent.stages.pipeline import Pipeline
    from firmware_agent.settings import load_config

    config = load_config(None, environ={"FOOTFALL_EPOCH_TIMEZONE": "UTC",
                                       "FOOTFALL_EPOCH_LENGTH": "300",
                                       "FOOTFALL_PRIVACY_MODE": sys.argv[1]})
    *ended, last = sys.argv[2:]
    for path in ended:  # a whole run each: fed, then finished as a stopping agent does
        pipeline = Pipeline(config)
        try:
            with CaptureReader(path) as reader:
                for batch in reader:
                    for _ in pipeline.feed(batch):
                        pass
        except NotACaptureError:
            continue  # refused before any frame: nothing was keyed
        for _ in pipeline.finish():
            pass
    pipeline = Pipeline(config)  # the last one stays running: its key is the live one
    with CaptureReader(last) as reader:
        for batch in reader:
            for _ in pipeline.feed(batch):
                pass
    print(keys[-1], *keys[:-1], "", sep="\\n", flush=True)  # the current key, rotated-out ones
    sys.stdin.readline()
    """
)


def _memory(pid: int) -> Iterator[bytes]:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "rw" not in fields[1] or (len(fields) > 5 and fields[5].startswith("/")):
                continue  # only the process's own writable memory: heap, stacks, anonymous
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except OSError:
                continue


def _siphash_state(key: bytes) -> list[bytes]:
    """SipHash's state v0..v3 right after initialisation under ``key`` (8 bytes each, little
    endian): the key XORed with the public constants, as the kernel holds it."""
    k0, k1 = struct.unpack("<QQ", key)
    constants = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)
    return [struct.pack("<Q", k ^ c) for k, c in zip((k0, k1, k0, k1), constants, strict=True)]


@pytest.mark.parametrize("mode", ["standard", "strict"])
def test_a_memory_dump_after_rotation_holds_no_previous_key(mode: str) -> None:
    """Best effort (docs/PRIVACY.md): one process runs the pipeline over every shared capture
    (each a whole run, finished) and then the bundled one (still running); its writable memory
    is searched for every rotated-out key, whole and by halves, and for the SipHash state
    derived from it."""
    captures = [str(shared_path("data", "pcaps", name)) for name in shared_capture_names()]
    child = subprocess.Popen(
        [sys.executable, "-c", _DUMP_CHILD, mode, *captures, str(BUNDLED_SAMPLE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONHASHSEED": "0"},
    )
    try:
        assert child.stdout is not None
        keys: list[bytes] = []
        while line := child.stdout.readline().strip():  # a blank line ends the keys
            k0, k1 = (int(word, 16) for word in line.split())
            keys.append(np.array([k0, k1], np.uint64).astype("<u8").tobytes())
        current, *old = keys
        assert len(old) >= 3, "the child ended early, or rotated too few times"
        memory = list(_memory(child.pid))
        assert any(current in blob for blob in memory), "the search cannot even find the live key"
        live = np.unique(np.frombuffer(current, "<u8"))
        assert sum(u64_hits(blob, live) for blob in memory) >= 2, "nor the live key's halves"
        # Every 8-byte needle: the key's halves (a whole key holds both) and the state words.
        needles = [part for raw in old for part in (raw[:8], raw[8:], *_siphash_state(raw))]
        wanted = np.unique(np.frombuffer(b"".join(needles), "<u8"))
        hits = sum(u64_hits(blob, wanted) for blob in memory)
        assert hits == 0, f"{hits} copies of rotated-out keys found in the process's memory"
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if child.stdin is not None:
            child.stdin.close()
