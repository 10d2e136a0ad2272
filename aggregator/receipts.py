"""Receipts: the aggregator tells each agent, signed, which of its windows it holds.

A window an agent's spool lets go on the broker's PUBACK is only as safe as the broker's memory:
a broker crash without persistence, a shared subscription Mosquitto 2.0 forgot over a restart,
an ingest replica gone for good with its share queued in its session, amqtt dropping what a
client had not acknowledged. So the store keeps, per agent, the seq ranges it has settled
(:meth:`aggregator.store.Store.store_batch`, table ``receipts``), and after each batch the ingest
process that stored it publishes the agent's receipt
(``firmware_agent/contract/schemas/receipt.v1.json``:
first, contiguous-through and last seq settled, the gaps between) on
``footfall/v1/<site>/<agent>/receipt``, retained, signed with the aggregator's receipt key. An
agent given the key's public half (``broker.receipt_key``) lets go of what a receipt covers and
sends again what none covers after ``broker.receipt_timeout_s``; the store skips what it holds.

* Each receipt is read from the database after the commit, so replicas sharing the counts
  publish receipts that cover what either stored (a later one never says less than an earlier
  one; one delayed by a race is superseded by the next).
* At most one receipt per agent per ``ingest.receipt_interval_ms``; a change in between goes
  out when that is over. QoS 0: a receipt lost on the way is superseded by the next, and an
  agent that is sent no receipt for long enough re-sends a window, whose skip makes one.
* The key: ``ingest.receipt_key_file`` (default ``<store.data_dir>/receipt.key``), 32 random
  bytes in base64, made (mode 0600) when missing; every replica needs the same file.
  ``footfall-aggregator receipt-key`` prints the public key agents are configured with.
"""

from __future__ import annotations

import base64
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import nacl.signing

from aggregator.errors import ConfigError, StoreError
from aggregator.store import Store
from firmware_agent.contract.errors import SigningKeyError
from firmware_agent.contract.messages import AgentId, SiteId, Topic, receipt_payload, seal
from firmware_agent.contract.signing import read_signing_key

__all__ = ["Receipts", "load_receipt_key"]

log = logging.getLogger("footfall.aggregator")


def load_receipt_key(path: Path) -> nacl.signing.SigningKey:
    """The receipt signing key in ``path``, made (mode 0600, its directory too) if the file
    does not exist: written aside, then linked into place, so processes starting together
    all read the one that won."""
    if not path.exists():
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, aside = tempfile.mkstemp(dir=path.parent, prefix=".receipt-key-")
            with os.fdopen(fd, "w") as out:
                out.write(base64.b64encode(bytes(nacl.signing.SigningKey.generate())).decode())
            try:
                os.link(aside, path)
                log.info("made a new receipt key in %s", path)
            except FileExistsError:
                pass
            finally:
                os.unlink(aside)
        except OSError as exc:
            raise ConfigError(
                f"ingest.receipt_key_file {path}: cannot make it: {exc.strerror}"
            ) from exc
    try:
        return read_signing_key(path)
    except SigningKeyError as exc:
        raise ConfigError(f"ingest.receipt_key_file: {exc}") from exc


class Receipts:
    """The agents whose receipts changed, published at most every ``interval_s`` each."""

    def __init__(
        self,
        key: nacl.signing.SigningKey,
        store: Store,
        publish: Callable[[str, bytes], bool],
        interval_s: float,
    ) -> None:
        self._key = key
        self._store = store
        self._publish = publish
        self._interval_s = interval_s
        self._dirty: set[int] = set()
        self._last: dict[int, float] = {}
        self._lock = threading.Lock()
        self.published = 0

    def changed(self, keys: Iterable[int]) -> None:
        """These agents' settled ranges moved (any thread)."""
        with self._lock:
            self._dirty.update(keys)

    def flush(self) -> None:
        """Publish the receipts that are due (the worker's thread)."""
        now = time.monotonic()
        with self._lock:
            due = {k for k in self._dirty if now - self._last.get(k, -1e18) >= self._interval_s}
            self._dirty -= due
        if not due:
            return
        try:
            settled = self._store.settled(due)
        except StoreError as exc:
            log.error("cannot read receipts: %s; trying again", exc)
            self.changed(due)
            return
        at = int(time.time())
        unsent = set()
        for key, (site, agent, ranges) in settled.items():
            site_id, agent_id = SiteId(site), AgentId(agent)
            body = seal(receipt_payload(site_id, agent_id, ranges, at), self._key)
            if self._publish(str(Topic(site_id, agent_id, "receipt")), body):
                self._last[key] = now
                self.published += 1
            else:
                unsent.add(key)
        if unsent:  # not connected: when we are again
            self.changed(unsent)
