"""Benchmark of the contract's JSON Schema check: validate time per counts message, ours
against maintained validators, in the same run.

The messages are the agent's own: the bundled sample's windows through its pipeline, sealed
as ``footfall-agent run`` seals them (counts v2), parsed back. Each check does what ingest's
verifier and the agent's ``seal`` do per message: the envelope's schema, then the payload's.

* ``SchemaCheck`` (:mod:`firmware_agent.contract.schema_check`): our compiler to closures;
* ``jsonschema`` ``is_valid`` (``Draft202012Validator``): its fastest path, a yes or no;
* ``jsonschema`` as ``seal`` used it: ``best_match(iter_errors(...))``, a reason when invalid;
* ``fastjsonschema`` 2.x (pure Python, generates code per schema; draft 7 semantics);
* ``jsonschema-rs`` (Rust, a binary wheel), ``is_valid``.

Besides the time, whether each refuses what the contract refuses and plain JSON Schema lets
through: an integer field given as the float ``11.0``; a pattern (``^...$``) that matches all
but a final newline (``re.search``: ``$`` also matches before it); and whether its reason
quotes a field's value (the verifier's refusals never quote the payload).

Usage: ``python bench/bench_schema.py [--messages 2000] [--repeat 5]``; a validator that is
not installed is left out of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_spool, when run as a script

from bench_spool import bodies, windows

from firmware_agent.contract.schema_check import SchemaCheck
from firmware_agent.settings import load_config

Check = Callable[[Any], bool]  # True when valid


def schema(name: str) -> dict[str, Any]:
    text = resources.files("firmware_agent.contract").joinpath(f"schemas/{name}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def candidates() -> dict[str, Callable[[dict[str, Any]], Check]]:
    """Name -> a function that builds a validity test from a schema."""

    def ours(s: dict[str, Any]) -> Check:
        check = SchemaCheck(s)
        return lambda x: check.errors(x) is None

    out: dict[str, Callable[[dict[str, Any]], Check]] = {"SchemaCheck (ours)": ours}
    try:
        from jsonschema import Draft202012Validator  # noqa: PLC0415
        from jsonschema.exceptions import best_match  # noqa: PLC0415

        out["jsonschema is_valid"] = lambda s: Draft202012Validator(s).is_valid

        def reasoned(s: dict[str, Any]) -> Check:
            validator = Draft202012Validator(s)
            return lambda x: best_match(validator.iter_errors(x)) is None

        out["jsonschema best_match (seal before)"] = reasoned
    except ImportError:
        pass
    try:
        import fastjsonschema  # noqa: PLC0415

        def fast(s: dict[str, Any]) -> Check:
            compiled = fastjsonschema.compile(s)

            def valid(x: Any) -> bool:
                try:
                    compiled(x)
                except fastjsonschema.JsonSchemaValueException:
                    return False
                return True

            return valid

        out[f"fastjsonschema {fastjsonschema.VERSION}"] = fast
    except ImportError:
        pass
    try:
        import jsonschema_rs  # noqa: PLC0415

        out["jsonschema-rs is_valid"] = lambda s: jsonschema_rs.validator_for(s).is_valid
    except ImportError:
        pass
    return out


def reason(name: str, instance: Any) -> str:
    """The candidate's reason for refusing ``instance`` under a one-field schema."""
    s = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}
    if name.startswith("SchemaCheck"):
        return SchemaCheck(s).errors(instance) or ""
    if name.startswith("jsonschema-rs"):
        import jsonschema_rs  # noqa: PLC0415

        return next((e.message for e in jsonschema_rs.validator_for(s).iter_errors(instance)), "")
    if name.startswith("jsonschema"):
        from jsonschema import Draft202012Validator  # noqa: PLC0415
        from jsonschema.exceptions import best_match  # noqa: PLC0415

        error = best_match(Draft202012Validator(s).iter_errors(instance))
        return "" if error is None else error.message
    import fastjsonschema  # noqa: PLC0415

    try:
        fastjsonschema.compile(s)(instance)
    except fastjsonschema.JsonSchemaValueException as exc:
        return exc.message
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    config = load_config(environ={})
    sealed, _ = bodies(config, windows(config, args.messages))
    envelopes = [json.loads(body) for body in sealed]
    assert {(e["payload"]["kind"], e["payload"]["v"]) for e in envelopes} == {("counts", 2)}
    probe = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"pattern": "^a$"}}}
    rows = []
    for name, build in candidates().items():
        envelope, payload = build(schema("envelope.v1")), build(schema("counts.v2"))
        assert all(envelope(e) and payload(e["payload"]) for e in envelopes), name
        best = float("inf")
        for _ in range(args.repeat):
            began = time.perf_counter()
            for e in envelopes:
                envelope(e)
                payload(e["payload"])
            best = min(best, (time.perf_counter() - began) / len(envelopes))
        strict = build(probe)
        rows.append(
            (
                name,
                best,
                not strict({"n": 11.0}),
                not strict({"s": "a\n"}),
                "-7" in reason(name, {"n": -7}),
            )
        )
    ours = rows[0][1]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; ")
    print(f"{len(envelopes):,} counts v2 messages, best of {args.repeat}\n")
    print("| check | µs / message | x SchemaCheck | refuses 11.0 | refuses 'a\\n' | quotes value |")
    print("|---|---:|---:|:-:|:-:|:-:|")
    for name, per, integral, newline, quotes in rows:
        yes = {True: "yes", False: "no"}
        print(
            f"| {name} | {per * 1e6:,.1f} | {per / ours:.2f} | {yes[integral]} "
            f"| {yes[newline]} | {yes[quotes]} |"
        )


if __name__ == "__main__":
    main()
