"""optimizerctl: talk to a running optimizerd over its control socket.

Exit codes: 0 ok, 1 daemon unreachable or no answer in time, 2 usage, config or request error.
Imports only what it needs (no aiohttp, grpc or prometheus_client) so that it answers fast.
"""
from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any

import click
import zmq

from ipc import messages as m
from ipc.endpoints import CONTROL_SOCKET, endpoint, socket_path
from supervisor.formatting import age, rss

CONFIG_ENV = "LLM_OPTIMIZER_CONFIG"
USAGE_CODES = {m.ErrorCode.BAD_REQUEST, m.ErrorCode.UNKNOWN_COMMAND, m.ErrorCode.NO_SUCH_SERVICE,
               m.ErrorCode.CONFIG_INVALID, m.ErrorCode.UNSUPPORTED_VERSION}


class Unreachable(Exception):
    pass


class Client:
    def __init__(self, runtime: str, timeout: float):
        self.path = socket_path(runtime, CONTROL_SOCKET)
        self.runtime, self.timeout = runtime, timeout

    def call(self, command: str, body: dict[str, Any] | None = None,
             timeout: float | None = None) -> m.Reply:
        if not os.path.exists(self.path):
            raise Unreachable(f"no control socket at {self.path}")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 16 * m.MAX_MESSAGE_BYTES)
        try:
            sock.connect(endpoint(self.runtime, CONTROL_SOCKET))
            request_id = int(time.monotonic_ns() % 1_000_000_000)
            sock.send(m.encode(m.Request(id=request_id, command=command, body=body or {})))
            deadline = time.monotonic() + (timeout or self.timeout)
            while (left := deadline - time.monotonic()) > 0:
                if not sock.poll(int(left * 1000) + 1):
                    break
                try:
                    reply = m.decode_reply(sock.recv())
                except m.ProtocolError as exc:
                    raise click.ClickException(f"bad reply from optimizerd: {exc}") from None
                if reply.id in (request_id, 0):
                    return reply
            raise Unreachable(f"no answer from optimizerd within {timeout or self.timeout:g} s")
        finally:
            sock.close()


def fail(code: int, message: str) -> None:
    click.echo(f"optimizerctl: {message}", err=True)
    sys.exit(code)


def request(ctx: click.Context, command: str, body: dict[str, Any] | None = None,
            timeout: float | None = None) -> Any:
    client: Client = ctx.obj
    try:
        reply = client.call(command, body, timeout)
    except Unreachable as exc:
        fail(1, f"optimizerd is not reachable: {exc}. Is it running with runtime_dir "
                f"{client.runtime}? (start it with `optimizerd start`, or pass --runtime-dir)")
    if not reply.ok:
        error = reply.error
        fail(2 if error and error.code in USAGE_CODES else 1,
             error.message if error else "request failed")
    return reply.result


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--runtime-dir", "runtime_override", type=click.Path(file_okay=False),
              help="optimizerd's runtime directory (default: from the config).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              envvar=CONFIG_ENV, help="The daemon's config file, to find its runtime directory.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for an answer to quick commands.")
@click.pass_context
def main(ctx: click.Context, runtime_override: str | None, config_path: str | None,
         timeout: float) -> None:
    """Control a running optimizerd."""
    runtime = runtime_override
    if not runtime:  # only then is the config read: --runtime-dir spares the import
        from ipc.config_loader import ConfigError, load_config
        from ipc.endpoints import runtime_dir

        try:
            runtime = runtime_dir(load_config(config_path))
        except ConfigError as exc:
            fail(2, f"config error: {exc}")
    ctx.obj = Client(os.path.abspath(runtime), timeout)


def render_table(doc: dict[str, Any]) -> str:
    sup = doc["supervisor"]
    lines = [f"optimizerd pid {sup['pid']}  {sup['state']}  up {age(sup['uptime_s'])}  "
             f"config {sup['config_hash']}"]
    header = ("SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "HB AGE", "HEALTH", "CPU%",
              "RSS", "REASON")
    rows = [header]
    for s in doc["services"]:
        name = s["name"] if s.get("instance", 0) == 0 else f"{s['name']}#{s['instance']}"
        cpu = "-" if s.get("cpu_percent") is None else f"{s['cpu_percent']:.1f}"
        rows.append((name, s["state"], str(s["pid"] or "-"), age(s["uptime_s"] or None),
                     str(s["restarts"]), age(s["heartbeat_age_s"]), s["health"], cpu,
                     rss(s.get("rss_bytes")), s["reason"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(line.rstrip() for line in lines)


def render_history(doc: dict[str, Any]) -> str:
    out = []
    for s in doc["services"]:
        out.append(f"\n{s['name']}#{s['instance']} history (last exit: {s['last_exit'] or '-'}):")
        for h in s["history"]:
            stamp = time.strftime("%H:%M:%S", time.localtime(h["at"]))
            out.append(f"  {stamp}  {h['from']:>8} -> {h['to']:<8}  {h['reason']}")
        if s.get("status"):
            out.append("  status: " + json.dumps(s["status"], sort_keys=True))
    return "\n".join(out)


@main.command()
@click.argument("service", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, stable keys.")
@click.pass_context
def status(ctx: click.Context, service: str | None, as_json: bool) -> None:
    """Supervisor and services; with SERVICE also its recent transitions."""
    doc = request(ctx, "status", {"service": service} if service else None)
    if as_json:
        click.echo(json.dumps(doc, indent=None if not service else 2))
    else:
        click.echo(render_table(doc) + (render_history(doc) if service else ""))


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read the config and apply it; on an invalid file nothing changes (exit 2)."""
    result = request(ctx, "reload", timeout=130)
    parts = [f"{k}: {', '.join(result[k])}" for k in ("added", "removed", "reloaded",
                                                       "restarted") if result.get(k)]
    click.echo(f"reloaded (config {result['config_hash']}); " + ("; ".join(parts) or
                                                                "nothing changed"))
    for note in result.get("notes", []):
        click.echo(f"note: {note}")


@main.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop every service and the daemon; returns once it has exited."""
    result = request(ctx, "stop", timeout=300)
    pid = result.get("pid")
    if isinstance(pid, int):
        wait_for_exit(pid, 30.0)
    click.echo("optimizerd stopped")


def wait_for_exit(pid: int, timeout: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            fail(1, f"optimizerd (pid {pid}) still running {timeout:g} s after it stopped "
                    "its services")
    finally:
        os.close(fd)


@main.command()
@click.argument("service")
@click.pass_context
def restart(ctx: click.Context, service: str) -> None:
    """Restart SERVICE (also from failed); returns once it is READY again."""
    result = request(ctx, "restart", {"service": service}, timeout=70)
    click.echo(f"{service}: {', '.join(result['states'])} (pid "
               f"{', '.join(str(p) for p in result['pids'])})")


@main.command()
@click.argument("service")
@click.argument("command")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
              help="An argument (a string); KEY:=JSON for any JSON value. Repeat.")
@click.pass_context
def call(ctx: click.Context, service: str, command: str, args: tuple[str, ...]) -> None:
    """Run an admin COMMAND in the worker that owns SERVICE's state (e.g. `info`)."""
    body: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            fail(2, f"--arg {arg!r}: expected KEY=VALUE or KEY:=JSON")
        if key.endswith(":"):
            key = key[:-1]
            try:
                body[key] = json.loads(value)
            except ValueError as exc:
                fail(2, f"--arg {arg!r}: the value after := is not JSON: {exc}")
        else:
            body[key] = value
    result = request(ctx, "call", {"service": service, "command": command, "args": body})
    click.echo(json.dumps(result, indent=2, sort_keys=True))


def storage_admin(ctx: click.Context, command: str, path: str, wait: float,
                  **args: Any) -> Any:
    """An admin command of the storage worker on a path, allowed ``wait`` seconds."""
    return request(ctx, "call", {"service": "storage", "command": command,
                                 "args": {"path": os.path.abspath(path), **args},
                                 "timeout_s": wait},
                   timeout=wait + 5)


wait_option = click.option("--timeout", "wait", type=float, default=600.0, show_default=True,
                           help="Seconds to wait for the copy.")


@main.command()
@click.argument("path", type=click.Path(exists=False))
@wait_option
@click.pass_context
def backup(ctx: click.Context, path: str, wait: float) -> None:
    """Copy the store to PATH, consistently, while running.

    PATH is a new directory (LevelDB: a copy of the store; PostgreSQL: a pg_dump), or a
    .tar.gz archive holding that copy, the daemon's config file and a manifest. The storage
    worker writes it, so PATH must be writable by the daemon's user (under systemd:
    /var/lib/llm-optimizer)."""
    config_file = request(ctx, "status")["supervisor"].get("config_file")
    result = storage_admin(ctx, "backup", path, wait, config_file=config_file)
    if "backend" in result:  # an archive
        held = result["store"]
        what = f"{held['keys']} keys" if "keys" in held else f"a pg_dump of {held['bytes']} " \
            "bytes"
        config = f" and {result['config']['source']}" if "config" in result else ""
        click.echo(f"archive of {what}{config} written to {result['path']} "
                   f"({result['bytes']} bytes)")
    elif "keys" in result:
        click.echo(f"backup of {result['keys']} keys written to {result['path']}")
    else:
        click.echo(f"pg_dump of {result['bytes']} bytes written to {result['file']}")


@main.command()
@click.argument("path", type=click.Path(exists=True))
@wait_option
@click.pass_context
def restore(ctx: click.Context, path: str, wait: float) -> None:
    """Replace the embedded store with the backup at PATH (a directory or a .tar.gz archive
    from `backup`), while running. The archive's config file is not put back: compare it with
    the running one yourself."""
    result = storage_admin(ctx, "restore", path, wait)
    click.echo(f"restored {result['keys']} keys from {result['restored_from']}")


def admin_listen(ctx: click.Context, supervisor: dict[str, Any]) -> str:
    """The daemon's ``[admin] listen``: its config file (status ``config_file``, relative to the
    daemon's working directory) read with this environment; else -c; else the defaults."""
    from ipc.config_loader import ConfigError, load_config

    path = supervisor.get("config_file") or ctx.find_root().params.get("config_path")
    if path and not os.path.isabs(path):
        try:
            path = os.path.join(os.readlink(f"/proc/{supervisor['pid']}/cwd"), path)
        except (OSError, KeyError, TypeError):
            pass
    try:
        return load_config(path).admin.listen
    except (ConfigError, OSError) as exc:
        fail(2, f"cannot find the admin address in {path or 'the built-in defaults'}: {exc}; "
                "pass --admin HOST:PORT")
        raise  # unreachable: fail() exits


@main.command()
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("--interval", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Seconds between refreshes; with --once, between the two scrapes the "
                   "rates are computed over (0: no rates).")
@click.option("--json", "as_json", is_flag=True, help="With --once: the frame as one JSON "
              "object.")
@click.option("--admin", "admin", metavar="HOST:PORT",
              help="The admin endpoint to read rates from (default: [admin] listen of the "
                   "daemon's config file).")
@click.pass_context
def top(ctx: click.Context, once: bool, interval: float, as_json: bool,
        admin: str | None) -> None:
    """Live view: state, pid, uptime, restarts, heartbeat age, CPU and RSS per process, ingest
    and spend rates. Refreshes every --interval seconds until `q` or Ctrl-C."""
    from supervisor import top as view

    if as_json and not once:
        fail(2, "--json needs --once")
    if not once and not sys.stdout.isatty():
        fail(2, "stdout is not a terminal: use `optimizerctl top --once` (or --once --json) "
                "in scripts")
    if not once and interval < 0.1:
        fail(2, "--interval must be at least 0.1 s in live mode")
    doc = request(ctx, "status")  # exits 1 with a hint when the daemon is not reachable
    client: Client = ctx.obj

    def status() -> dict[str, Any]:
        reply = client.call("status", timeout=min(client.timeout, 3.0))  # keep refreshing
        if not reply.ok:
            raise RuntimeError(reply.error.message if reply.error else "status failed")
        return reply.result

    source = view.Source(status, view.admin_url(admin or admin_listen(ctx, doc["supervisor"])))
    if once:
        view.run_once(source, interval, as_json)
    else:
        sys.exit(view.run_live(source, interval))



# --- API keys and tokens of the REST API -----------------------------------------------------
# API keys are read and written in the storage worker directly (as the REST API does), so that
# keys can be made before the REST API runs, e.g. the first admin key. Imports are lazy: these
# commands need the REST API's modules, ``status`` must stay fast.

class _SyncCaller:
    """The async ``call`` the API key store expects, over a blocking storage client."""

    def __init__(self, runtime: str, timeout: float) -> None:
        from workers.storage_client import SyncStorageClient
        self.client = SyncStorageClient(runtime, timeout)

    async def call(self, op: Any, timeout: float | None = None) -> Any:
        return self.client.call(op, timeout)


def with_key_store(ctx: click.Context, action: Any) -> Any:
    """Run ``action(store)`` (a coroutine function) on the daemon's API key store."""
    import asyncio

    from ipc.storage import StorageFailure, StorageTimeout
    from workers.rest_api.api_keys import ApiKeyStore

    client: Client = ctx.obj
    caller = _SyncCaller(client.runtime, client.timeout)
    try:
        return asyncio.run(action(ApiKeyStore(caller)))
    except StorageTimeout as exc:
        fail(1, f"the storage worker did not answer ({exc}); is optimizerd running?")
    except StorageFailure as exc:
        fail(1, f"storage: {exc}")
    finally:
        caller.client.close()


ROLES = click.Choice(["viewer", "operator", "admin"])


@main.group("api-key")
def api_key() -> None:
    """API keys of the REST API (stored hashed; a key is shown once, at creation)."""


@api_key.command("create")
@click.option("--role", required=True, type=ROLES, help="What the key may do.")
@click.option("--name", default="", help="Who or what uses the key (default: the role).")
@click.option("--json", "as_json", is_flag=True, help='{"id", "name", "role", "key"}.')
@click.pass_context
def api_key_create(ctx: click.Context, role: str, name: str, as_json: bool) -> None:
    """Create a key; it is printed once, alone on the last line."""
    from workers.rest_api.auth import Role

    record, key = with_key_store(ctx, lambda store: store.create(name or role, Role(role)))
    if as_json:
        click.echo(json.dumps({"id": record.id, "name": record.name, "role": record.role.value,
                               "key": key}))
    else:
        click.echo(f"API key {record.id} ({record.name}, {record.role.value}); store it now, "
                   "it is not shown again:")
        click.echo(key)


@api_key.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
@click.pass_context
def api_key_list(ctx: click.Context, as_json: bool) -> None:
    """Every key (never its secret), revoked ones included."""
    keys = with_key_store(ctx, lambda store: store.list())
    rows = [{"id": k.id, "name": k.name, "role": k.role.value, "created_ms": k.created_ms,
             "revoked": k.revoked} for k in keys]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created_ms"] / 1000))
        state = "revoked" if row["revoked"] else "active"
        click.echo(f"{row['id']}  {row['role']:<8}  {state:<7}  {created}  {row['name']}")


@api_key.command("revoke")
@click.argument("key_id")
@click.pass_context
def api_key_revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key (idempotent); every API process refuses it within seconds."""
    record = with_key_store(ctx, lambda store: store.revoke(key_id))
    if record is None:
        fail(2, f"no API key {key_id!r}")
    click.echo(f"API key {record.id} ({record.name}) revoked")


@main.group()
def token() -> None:
    """JWTs for the REST API, signed with the key of [rest_api.jwt]."""


@token.command("create")
@click.option("--subject", required=True, help="The sub claim: who the token is for.")
@click.option("--role", required=True, type=ROLES)
@click.option("--ttl", type=int, default=3600, show_default=True, help="Lifetime, seconds.")
@click.pass_context
def token_create(ctx: click.Context, subject: str, role: str, ttl: int) -> None:
    """Print a signed token (needs the config file, for [rest_api.jwt] and its key files)."""
    from ipc.config_loader import ConfigError, load_config
    from workers.rest_api.auth import JwtIssuer, Role

    config_path = ctx.find_root().params.get("config_path")
    try:
        issuer = JwtIssuer(load_config(config_path).rest_api.jwt)
        click.echo(issuer.issue(subject, Role(role), ttl))
    except ConfigError as exc:
        fail(2, f"config error: {exc}")
    except (ValueError, OSError) as exc:
        fail(2, f"cannot sign a token: {exc}")

if __name__ == "__main__":
    main()
