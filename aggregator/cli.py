"""``footfall-aggregator``: the aggregator's command line.

Errors end as one line on stderr (``footfall-aggregator: error: ...``) and exit status 1 (2 for
usage errors); no traceback. Logs go unbuffered to stderr through the ``footfall.aggregator``
logger and never carry a payload.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from aggregator import __version__
from aggregator.accounts import MAX_TOKEN_DAYS, TOKEN_DAYS, Accounts, UserRow, check_new_user
from aggregator.config import SETTINGS, AggregatorConfig, load_config
from aggregator.errors import AccountError, AggregatorError, StoreError
from aggregator.store import AgentHealth, Store, check_new_site, engine_url
from firmware_agent.contract.checks import exit_status, print_table
from firmware_agent.contract.command_line import run_command
from firmware_agent.contract.messages import public_key_text
from firmware_agent.contract.resolve import show

log = logging.getLogger("footfall.aggregator")


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value


def _config(args: argparse.Namespace) -> AggregatorConfig:
    return load_config(args.config, overrides=dict(args.set or []))


def _store(args: argparse.Namespace, *, creates: bool = False) -> Store:
    """The store; unless the command ``creates`` one, a SQLite file that is not there is an
    error rather than a new, empty database (a failed command leaves nothing behind)."""
    settings = _config(args).store
    if settings.is_sqlite and not creates:
        database = engine_url(settings).database
        if database and database != ":memory:" and not Path(database).exists():
            raise StoreError(
                f"no database at {database}: 'footfall-aggregator sites add' (or migrate) "
                "makes it; is --config the aggregator's?"
            )
    return Store.open(settings)


def _when(unix_s: int | None) -> str:
    if unix_s is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def _table(rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(f"{cell!s:<{w}}" for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _config(args)
    with Store(config.store) as store:
        revision = store.migrate()
        print(f"database {store.where}: schema at revision {revision}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from aggregator.ingest import Ingest  # noqa: PLC0415 (paho only for this command)

    config = _config(args)
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))  # a service says what it does
    with Store.open(config.store) as store:
        ingest = Ingest(config, store)
        stopping = threading.Event()

        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: finishing the batch in hand", signal.Signals(signum).name)
            stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info(
            "ingest: database %s, broker %s, share group %s",
            store.where,
            config.broker.address,
            config.ingest.share_group,
        )
        thread = ingest.start(on_end=stopping.set)
        while not stopping.wait(0.5):  # this thread takes the signals: it never waits long
            pass
        ingest.finish(thread)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from aggregator.serve import serve  # noqa: PLC0415 (the web stack only for this command)

    config = _config(args)
    log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
    with Store.open(config.store) as store:
        serve(config, store)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aggregator.demo import DEMO_DAYS, run_demo  # noqa: PLC0415

    days = DEMO_DAYS if args.days is None else args.days
    return run_demo(args.port, args.timezone, args.broker, days)


def _password(args: argparse.Namespace) -> str:
    """The password from stdin (``--password-stdin``) or asked twice at the terminal."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise AccountError("the two passwords differ")
    return first


def cmd_users_add(args: argparse.Namespace) -> int:
    password = _password(args)
    check_new_user(args.name, args.role, password)  # before a database is made for it
    with _store(args, creates=True) as store:
        Accounts(store).add_user(args.name, args.role, password, int(time.time()), args.site or ())
    print(f"user {args.name} added ({args.role})")
    return 0


def _print_user(row: UserRow, what: str) -> None:
    sites = ",".join(row.sites) or "-"
    print(f"user {row.name} ({row.role}, sites {sites}): {what}")


def cmd_users_grant(args: argparse.Namespace) -> int:
    with _store(args) as store:
        _print_user(Accounts(store).grant(args.name, args.site), f"sees site {args.site}")
    return 0


def cmd_users_revoke_grant(args: argparse.Namespace) -> int:
    with _store(args) as store:
        row = Accounts(store).revoke_grant(args.name, args.site)
    _print_user(row, f"no longer sees site {args.site}, from their next request on")
    return 0


def cmd_users_disable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        row = Accounts(store).disable(args.name, int(time.time()))
    _print_user(row, "disabled; their sessions have ended and their API tokens are revoked")
    return 0


def cmd_users_enable(args: argparse.Namespace) -> int:
    with _store(args) as store:
        row = Accounts(store).enable(args.name)
    _print_user(row, "enabled (their old API tokens stay revoked)")
    return 0


def cmd_users_password(args: argparse.Namespace) -> int:
    with _store(args) as store:
        Accounts(store).set_password(args.name, _password(args), int(time.time()))
    print(f"user {args.name}: new password set; their sessions have ended and API tokens revoked")
    return 0


def cmd_users_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rows = Accounts(store).user_rows()
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
    elif rows:
        _table(
            [("USER", "ROLE", "STATE", "SITES")]
            + [
                (
                    u.name,
                    u.role,
                    "enabled" if u.disabled_at is None else f"disabled {_when(u.disabled_at)}",
                    ",".join(u.sites) or "-",
                )
                for u in rows
            ]
        )
    return 0


def cmd_users_token(args: argparse.Namespace) -> int:
    with _store(args) as store:
        accounts = Accounts(store)
        user = accounts.user(args.name)
        secret = accounts.add_token(user, args.token_name, int(time.time()), args.expires)
    print(secret)
    return 0


def cmd_users_tokens(args: argparse.Namespace) -> int:
    now = int(time.time())
    with _store(args) as store:
        tokens = Accounts(store).tokens(args.name)
    if args.json:
        for t in tokens:
            print(json.dumps(asdict(t) | {"state": t.state(now)}))
    elif tokens:
        _table(
            [("ID", "USER", "NAME", "STATE", "MADE", "EXPIRES", "LAST USED")]
            + [
                (
                    t.id,
                    t.user,
                    t.name,
                    t.state(now),
                    _when(t.created_at),
                    _when(t.expires_at),
                    _when(t.last_used_at),
                )
                for t in tokens
            ]
        )
    return 0


def cmd_users_revoke_token(args: argparse.Namespace) -> int:
    with _store(args) as store:
        row = Accounts(store).revoke_token(None, args.token_id, int(time.time()))
    if row is None:
        raise AccountError(
            f"no live API token {args.token_id} (footfall-aggregator users tokens lists them)"
        )
    print(f"token {row.id} ({row.name}) of user {row.user} revoked")
    return 0


def cmd_sites_add(args: argparse.Namespace) -> int:
    check_new_site(args.site, args.timezone)  # before a database is made for it
    with _store(args, creates=True) as store:
        store.add_site(args.site, args.name or args.site, args.timezone, int(time.time()))
    print(f"site {args.site} added (time zone {args.timezone})")
    return 0


def cmd_sites_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        sites = store.sites()
    if args.json:
        for site in sites:
            print(json.dumps(asdict(site)))
    elif sites:
        _table(
            [("SITE", "NAME", "TIME ZONE", "AGENTS")]
            + [(s.id, s.name, s.timezone, s.agents) for s in sites]
        )
    return 0


def cmd_agents_add(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.add_agent(
            args.site, args.agent, args.public_key, int(time.time()), replace=args.replace
        )
    print(f"agent {args.site}/{args.agent} enrolled")
    return 0


def cmd_agents_revoke(args: argparse.Namespace) -> int:
    with _store(args) as store:
        store.revoke_agent(args.site, args.agent, int(time.time()))
    print(f"agent {args.site}/{args.agent} revoked: its new messages are refused")
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    with _store(args) as store:
        agents = store.agents(args.site)
    if args.json:
        for agent in agents:
            print(json.dumps(asdict(agent)))
        return 0
    if not agents:
        return 0
    rows: list[Sequence[object]] = [
        (
            "SITE",
            "AGENT",
            "ENROLMENT",
            "STATE",
            "LAST SEEN",
            "WINDOWS",
            "LAST WINDOW",
            "MISSING",
            "REFUSED",
            "SPOOL",
            "SPOOL DROPPED",
            "EVICTIONS",
            "SENDS",
        )
    ]
    for a in agents:
        enrolment = f"revoked {_when(a.revoked_at)}" if a.revoked_at is not None else "enrolled"
        rows.append(
            (
                a.site,
                a.agent,
                enrolment,
                a.state or "-",
                _when(a.last_seen_at),
                a.windows,
                _when(a.last_window),
                a.missing,
                a.refused,
                _spool(a),
                "-" if a.spool_dropped is None else a.spool_dropped,
                _evictions(a),
                _sends(a),
            )
        )
    _table(rows)
    return 0


def _sends(a: AgentHealth) -> str:
    """Which counts the agent sends: its latest window's version, else its meta's."""
    version = a.counts_v or a.meta_counts_v
    if version is None:
        return "-"
    said = "" if a.counts_v else " (meta)"
    return f"people v2{said}" if version >= 2 else f"devices v1{said}: upgrade it"


def _evictions(a: AgentHealth) -> str:
    """``count/estimate`` eviction rounds since the agent started; ``-`` from a status v1."""
    if a.count_evictions is None or a.estimate_evictions is None:
        return "-"
    return f"{a.count_evictions}/{a.estimate_evictions}"


def _spool(a: AgentHealth) -> str:
    if a.spool_pending is None:
        return "-"
    return f"{a.spool_pending} filling" if a.spool_filling else str(a.spool_pending)


def cmd_agents_check(args: argparse.Namespace) -> int:
    from aggregator.agent_check import check_agent  # noqa: PLC0415

    with _store(args) as store:
        findings = check_agent(store, args.site, args.agent)
    print_table(findings)
    return exit_status(findings)


def cmd_agents_gaps(args: argparse.Namespace) -> int:
    with _store(args) as store:
        gaps = store.gaps(args.site, args.agent, args.limit)
    if args.json:
        for gap in gaps:
            print(json.dumps(asdict(gap)))
    elif gaps:
        _table(
            [("AFTER SEQ", "BEFORE SEQ", "FROM", "TO", "MISSING")]
            + [
                (
                    g.after_seq,
                    g.before_seq,
                    _when(g.after_window),
                    _when(g.before_window),
                    g.missing,
                )
                for g in gaps
            ]
        )
    return 0


def cmd_refusals(args: argparse.Namespace) -> int:
    with _store(args) as store:
        counts = store.refusal_counts()
    rows = sorted(counts.items())
    if args.json:
        for (reason, site, agent), n in rows:
            print(json.dumps({"reason": reason, "site": site, "agent": agent, "count": n}))
    elif rows:
        _table(
            [("REASON", "SITE", "AGENT", "COUNT")]
            + [(reason, site or "-", agent or "-", n) for (reason, site, agent), n in rows]
        )
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    with _store(args) as store:
        rows = store.quarantined()
    if args.json:
        for row in rows:
            print(json.dumps({k: v for k, v in row.items() if k != "id"}))
    elif rows:
        _table(
            [("RECEIVED", "REASON", "SITE", "AGENT", "BYTES", "SHA-256", "ERROR")]
            + [
                (
                    _when(row["received_at"]),
                    row["reason"],
                    row["site_id"] or "-",
                    row["agent_id"] or "-",
                    row["size"],
                    row["digest"][:16],
                    row["error"][:80],
                )
                for row in rows
            ]
        )
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    config = _config(args)
    with Store.open(config.store) as store:
        deleted = store.prune(int(time.time()), config.store.retention_days)
    print(f"deleted {deleted} windows older than {config.store.retention_days} days")
    return 0


def cmd_receipt_key(args: argparse.Namespace) -> int:
    from aggregator.receipts import load_receipt_key  # noqa: PLC0415 (only for this command)

    path = Path(_config(args).ingest.receipt_key_file)
    print(public_key_text(load_receipt_key(path)))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = _config(args)
    print(show(SETTINGS, config.values, config.sources, help_text=args.help_text))
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="aggregator TOML config file")
    parser.add_argument(
        "--set",
        type=_setting,
        action="append",
        metavar="NAME=VALUE",
        help="override one setting (repeatable), e.g. store.dsn=postgresql://…",
    )


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description or help_text
    )
    _common(parser)
    parser.set_defaults(func=func)
    return parser


def _user_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    func: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    """A ``users`` action on one user, named first."""
    parser = _command(sub, name, func, help_text)
    parser.add_argument("name", metavar="NAME")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="footfall-aggregator",
        description="footfall aggregator: verified ingest of agents' counts, store, roll-ups.",
    )
    parser.add_argument("--version", action="version", version=f"footfall-aggregator {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _command(
        sub,
        "ingest",
        cmd_ingest,
        "receive agents' counts from the broker, verify and store them (until SIGTERM)",
        "Subscribe to every agent's counts (a shared subscription: several ingest processes "
        "split them), status and meta; verify each message (schema, topic, enrolled agent, "
        "signature), store it once, and acknowledge it to the broker after the commit.",
    )
    _command(sub, "migrate", cmd_migrate, "create or upgrade the database schema")
    _command(
        sub,
        "receipt-key",
        cmd_receipt_key,
        "print the public key of the receipt key (made if missing), for agents' broker.receipt_key",
        "Print the public half of ingest.receipt_key_file, the key ingest signs agents' "
        "receipts with (made if the file is missing): give it to every agent as "
        "broker.receipt_key, and the file to every ingest replica.",
    )
    _command(
        sub,
        "prune",
        cmd_prune,
        "delete windows older than store.retention_days now (roll-ups stay)",
    )
    _command(
        sub,
        "refusals",
        cmd_refusals,
        "messages not stored, counted by reason, site and agent",
    ).add_argument("--json", action="store_true", help="one JSON object per line")
    _command(
        sub,
        "quarantine",
        cmd_quarantine,
        "messages that failed verifying or storing on their own (the newest 10,000)",
    ).add_argument(
        "--json", action="store_true", help="one JSON object per line, the message's text too"
    )

    sites = sub.add_parser("sites", help="sites: add, list")
    sites_sub = sites.add_subparsers(dest="sites_command", required=True, metavar="ACTION")
    p = _command(sites_sub, "add", cmd_sites_add, "register a site and its time zone")
    p.add_argument("site", metavar="SITE", help="site id, as in the agents' topics")
    p.add_argument(
        "--timezone", required=True, help="IANA zone of its local hours and days, e.g. Europe/Paris"
    )
    p.add_argument("--name", help="a name for people (default: the id)")
    p = _command(sites_sub, "list", cmd_sites_list, "list the sites")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    agents = sub.add_parser("agents", help="agents: add, list, check, revoke, gaps")
    agents_sub = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    p = _command(
        agents_sub,
        "add",
        cmd_agents_add,
        "enrol an agent with its public key",
        "Enrol an agent of a site with its Ed25519 public key (base64: what 'footfall-agent "
        "keygen' prints). Only enrolled agents' messages are stored.",
    )
    p.add_argument("site", metavar="SITE")
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("public_key", metavar="PUBKEY", help="base64 of the 32-byte Ed25519 key")
    p.add_argument(
        "--replace", action="store_true", help="a new key for an enrolled or revoked agent"
    )
    p = _command(
        agents_sub,
        "list",
        cmd_agents_list,
        "agents and their health",
        "Every agent with its health: enrolled or revoked, online or offline (its last status "
        "message), last seen, windows stored, the last window, windows missing (gaps in its "
        "sequence numbers), windows its spool dropped, and which counts it sends (people, v2, "
        "or devices only, v1: an agent to upgrade; from its meta before its first window).",
    )
    p.add_argument("--site", help="only this site's agents")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = _command(
        agents_sub,
        "check",
        cmd_agents_check,
        "check one agent's path to the store (exit status 1 if a check failed)",
        "One table, a fix under each failing line: the site exists, the agent is enrolled "
        "and not revoked, none of its messages were refused, its windows are stored, its last "
        "status. The aggregator's side of 'footfall-agent doctor'.",
    )
    p.add_argument("site", metavar="SITE")
    p.add_argument("agent", metavar="AGENT")
    p = _command(
        agents_sub,
        "revoke",
        cmd_agents_revoke,
        "refuse an agent's messages from now on (its stored windows stay)",
    )
    p.add_argument("site", metavar="SITE")
    p.add_argument("agent", metavar="AGENT")
    p = _command(
        agents_sub, "gaps", cmd_agents_gaps, "the latest gaps in an agent's windows, newest first"
    )
    p.add_argument("site", metavar="SITE")
    p.add_argument("agent", metavar="AGENT")
    p.add_argument("--limit", type=int, default=50, help="at most this many gaps (default 50)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")

    p = sub.add_parser(
        "enrol",
        aliases=["enroll"],
        help="enrol an agent (the form 'footfall-agent enrol' prints; same as 'agents add'; "
        "'enroll' too)",
        description="Enrol an agent of a site with its public key, as 'footfall-agent enrol' "
        "prints the command; the site must exist (sites add). Nothing is written if it fails.",
    )
    _common(p)
    p.set_defaults(func=cmd_agents_add)
    p.add_argument("--site", required=True)
    p.add_argument("--agent", required=True)
    p.add_argument("--public-key", dest="public_key", required=True)
    p.add_argument("--replace", action="store_true", help="a new key for an enrolled agent")

    _command(
        sub,
        "serve",
        cmd_serve,
        "run the API and the dashboard (and ingest, unless serve.ingest is off)",
        "Serve the HTTP API (OpenAPI at /api/v1/openapi.json) and the merchants' dashboard on "
        "serve.host:serve.port; with serve.ingest on (the default) ingest runs in the same "
        "process.",
    )

    p = _command(
        sub,
        "demo",
        cmd_demo,
        "the whole system on this machine: broker, aggregator, two shops' agents counting "
        "their generated phones, an agent replaying a capture",
    )
    p.add_argument("--port", type=int, default=8080, help="the dashboard's port (default 8080)")
    p.add_argument("--timezone", default="Europe/Paris", help="the demo shop's time zone (IANA)")
    p.add_argument(
        "--broker",
        default=os.environ.get("FOOTFALL_DEMO_BROKER", "auto"),
        help="'auto' (the default, or FOOTFALL_DEMO_BROKER): Mosquitto if installed, else the "
        "embedded amqtt; 'mosquitto'; 'embedded' (amqtt, MQTT 3.1.1)",
    )
    p.add_argument(
        "--days",
        type=int,
        help="how many days of the two shops' phones their agents count (default: five "
        "weeks); fewer start sooner",
    )

    users = sub.add_parser(
        "users",
        help="accounts: add, grant, revoke-grant, disable, enable, password, list, token, "
        "tokens, revoke-token",
    )
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = _user_command(
        users_sub,
        "add",
        cmd_users_add,
        "add a user (the first admin too); the password is asked for, never defaulted",
    )
    p.add_argument("--role", required=True, choices=("merchant", "installer", "admin"))
    p.add_argument("--site", action="append", help="grant this site (repeatable)")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    p = _user_command(users_sub, "grant", cmd_users_grant, "let a user see a site")
    p.add_argument("site", metavar="SITE")
    p = _user_command(
        users_sub,
        "revoke-grant",
        cmd_users_revoke_grant,
        "stop a user seeing a site (from their next request on)",
    )
    p.add_argument("site", metavar="SITE")
    _user_command(
        users_sub,
        "disable",
        cmd_users_disable,
        "disable a user: no login; their sessions end and their API tokens are revoked",
    )
    _user_command(
        users_sub,
        "enable",
        cmd_users_enable,
        "let a disabled user log in again (their old API tokens stay revoked)",
    )
    p = _user_command(
        users_sub,
        "password",
        cmd_users_password,
        "set a user's password (ends their sessions and revokes their API tokens)",
    )
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    p = _command(users_sub, "list", cmd_users_list, "list the users, their roles, state and sites")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = _user_command(
        users_sub, "token", cmd_users_token, "make an API token for a user (printed this once)"
    )
    p.add_argument("token_name", metavar="TOKEN_NAME", help="what the token is for")
    p.add_argument(
        "--expires",
        type=int,
        default=TOKEN_DAYS,
        metavar="DAYS",
        help=f"days until the token expires (default {TOKEN_DAYS}, at most {MAX_TOKEN_DAYS})",
    )
    p = _command(
        users_sub,
        "tokens",
        cmd_users_tokens,
        "list API tokens (every user's, or one's): id, state, made, expires, last used",
    )
    p.add_argument("name", metavar="NAME", nargs="?", help="only this user's tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = _command(
        users_sub,
        "revoke-token",
        cmd_users_revoke_token,
        "revoke any user's API token, by its id (users tokens lists them)",
    )
    p.add_argument("token_id", metavar="ID", type=int)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    _command(
        config_sub, "show", cmd_config_show, "print the effective settings, secrets masked"
    ).add_argument("--help-text", action="store_true", help="each setting's help under it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("footfall-aggregator", log, AggregatorError, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
