"""The local dev vault: an init server on 127.0.0.1 with local stand-ins for Fly.

``fly-vault local up`` starts ``python -m flyvault.localvault serve`` as a detached process.
That process runs the OIDC issuer stand-in, the ``/.fly/api`` socket stand-in and the init
server in host mode (commands run as the current user, no rootfs), and writes a ready file.
The parent then adds or updates ``[vault.local]`` in the config — address, a fresh access
token and the development issuer override — keeping every other entry and any keys the user
added to this one (``forward``, say).

State lives under ``<XDG data dir>/fly-vault/local/``: ``state.json`` (pid, address, issuer),
``init.log``, the server's data dir and the API socket.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flyvault.errors import ConfigError, VaultError
from flyvault.paths import data_dir

LOCAL_ORG = "local"
LOCAL_APP = "fly-vault-local"
START_TIMEOUT = 20.0
#: ``down`` waits this long for the vault to end its sessions, stop the workload and remove
#: its cgroups before it kills the server (which would leave them to the next ``up``).
STOP_TIMEOUT = 40.0
_MODULE = "flyvault.localvault"


@dataclass
class LocalState:
    pid: int
    host: str
    port: int
    issuer_base_url: str
    machine_id: str
    mode: str
    started_at: float
    data_dir: str
    log_file: str


def state_dir() -> Path:
    return data_dir() / "local"


def _state_file() -> Path:
    return state_dir() / "state.json"


def read_state() -> LocalState | None:
    try:
        raw = json.loads(_state_file().read_text())
        return LocalState(**raw)
    except (OSError, ValueError, TypeError):
        return None


def _is_our_process(pid: int) -> bool:
    """True if ``pid`` is alive and is a local-vault server (guards against PID reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return sys.platform != "linux"
    return _MODULE.encode() in cmdline


def running_state() -> LocalState | None:
    state = read_state()
    if state is not None and _is_our_process(state.pid):
        return state
    return None


def up(
    name: str = "local",
    port: int = 0,
    rootfs: Path | None = None,
    *,
    allow_devices: bool = False,
    max_expansion_ratio: int | None = None,
    memory_max: int | None = None,
    cpu_max: float | None = None,
) -> tuple[LocalState, bool]:
    """Start the local vault unless it runs; returns (state, started_now).

    With ``rootfs`` (root only) the vault runs in VM mode: the workload gets its own
    namespaces (PID, mount, cgroup, UTS with ``name`` as hostname, IPC) and cgroup on that
    rootfs, provisioned by the first connect, exactly as on a Fly Machine; ``memory_max``
    and ``cpu_max`` limit it. Without it, host mode. ``allow_devices`` and
    ``max_expansion_ratio`` go into the entry with the rootfs (``rootfs_allow_devices``,
    ...): the first connect sends them.
    """
    from flyvault.config import VaultConfig, load_config, save_vault
    from flyvault.errors import UsageError

    if rootfs is None and (allow_devices or max_expansion_ratio is not None):
        raise UsageError(
            "--allow-devices and --max-expansion-ratio apply to a rootfs: they need --rootfs",
            hint="add --rootfs TAR.GZ (vm mode, as root)",
        )
    if rootfs is None and (memory_max is not None or cpu_max is not None):
        raise UsageError(
            "--memory-max and --cpu-max limit the workload of a rootfs: they need --rootfs",
            hint="add --rootfs TAR.GZ (vm mode, as root); host mode runs commands directly "
            "on this machine",
        )
    if rootfs is not None:
        if os.geteuid() != 0:
            raise UsageError(
                "the local vault needs root to run a rootfs in its own namespaces",
                hint="run as root, or drop --rootfs to use host mode",
            )
        rootfs = rootfs.expanduser().resolve()
        if not rootfs.is_file():
            raise UsageError(f"--rootfs {rootfs}: no such file", hint="give a .tar.gz rootfs")

    existing = running_state()
    if existing is not None:
        return existing, False
    # Validate the config before starting anything, so a broken file loses nothing.
    config = load_config(missing_ok=True)
    base = state_dir()
    ready = base / "ready.json"
    log_file = base / "init.log"
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        ready.unlink(missing_ok=True)
        log_file.touch()
    except OSError as exc:
        raise ConfigError(
            f"cannot use the local vault directory {base}: {exc.strerror or exc}",
            hint="it is $XDG_DATA_HOME/fly-vault/local: set XDG_DATA_HOME to a writable "
            "directory, or unset it for the default (~/.local/share)",
        ) from None
    from server.auth import token_pipe

    token = secrets.token_urlsafe(32)
    # The token goes over a pipe, never the environment (which /proc exposes).
    token_fd = token_pipe(token)
    env = {key: value for key, value in os.environ.items() if key != "ACCESS_TOKEN"}
    command = [
        sys.executable,
        "-m",
        _MODULE,
        "serve",
        "--state-dir",
        str(base),
        "--port",
        str(port),
        "--ready-file",
        str(ready),
        "--access-token-fd",
        str(token_fd),
        "--name",
        name,
        *(("--vm",) if rootfs is not None else ()),
        *(("--memory-max", str(memory_max)) if memory_max is not None else ()),
        *(("--cpu-max", repr(cpu_max)) if cpu_max is not None else ()),
    ]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            pass_fds=(token_fd,),
        )
    os.close(token_fd)
    deadline = time.monotonic() + START_TIMEOUT
    while not ready.exists():
        if process.poll() is not None:
            raise VaultError(
                f"the local vault exited during start-up (code {process.returncode})",
                hint=f"see {log_file}",
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise VaultError(
                f"the local vault did not start within {START_TIMEOUT:g} s", hint=f"see {log_file}"
            )
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    state = LocalState(
        pid=process.pid,
        host=info["host"],
        port=info["port"],
        issuer_base_url=info["issuer_base_url"],
        machine_id=info["machine_id"],
        mode=info["mode"],
        started_at=time.time(),
        data_dir=info["data_dir"],
        log_file=str(log_file),
    )
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    os.replace(tmp, _state_file())
    previous = config.vaults.get(name)
    fields = previous.to_fields(exclude=frozenset({"name", "access_token"})) if previous else {}
    fields.update(
        address=f"{state.host}:{state.port}",
        org=LOCAL_ORG,
        app=LOCAL_APP,
        machine_id=state.machine_id,
        access_token=token,
        oidc_issuer_url=state.issuer_base_url,
    )
    if rootfs is not None:
        # The options describe this rootfs: the command line sets them, defaults included.
        fields.update(
            rootfs=str(rootfs),
            rootfs_url=None,
            rootfs_allow_devices=allow_devices,
            rootfs_max_expansion_ratio=max_expansion_ratio,
        )
    try:
        save_vault(VaultConfig(name=name, **fields))
    except VaultError:
        stop_process(state.pid)
        raise
    return state, True


def stop_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not _is_our_process(pid) or _reaped(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reaped(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        # Not our child: alive-ness is decided by _is_our_process.
        return False
    return done == pid


def down() -> LocalState | None:
    state = running_state()
    if state is None:
        _state_file().unlink(missing_ok=True)
        return None
    stop_process(state.pid)
    _state_file().unlink(missing_ok=True)
    return state


# The background process ------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from flyvault.standins.flyapi import FlyApiSocket, MachineIdentity
    from flyvault.standins.oidc import OidcIssuer

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from flyvault.redact import install_log_filter

    install_log_filter()
    base = Path(args.state_dir)
    server_data = base / "data"
    server_data.mkdir(parents=True, exist_ok=True)
    identity = MachineIdentity.default(LOCAL_ORG, LOCAL_APP, region="local")
    socket_path = base / "fly-api.sock"
    with OidcIssuer() as issuer, FlyApiSocket(socket_path, issuer, identity):
        return asyncio.run(_run_server(args, issuer.base_url, identity.machine_id, server_data))


async def _run_server(
    args: argparse.Namespace, issuer_base_url: str, machine_id: str, server_data: Path
) -> int:
    import asyncio

    from server.app import ServerOptions, VaultServer
    from server.attestation import FlyOidcAttestor
    from server.auth import AccessToken

    token = AccessToken.from_fd(args.access_token_fd)
    if not token.configured:
        raise ConfigError("the local vault was started without an access token")
    options = ServerOptions(
        listen_host="127.0.0.1",
        listen_port=args.port,
        data_dir=server_data,
        host_mode=not args.vm,
        hostname=args.name,
        memory_max=args.memory_max,
        cpu_max=args.cpu_max,
    )
    attestor = FlyOidcAttestor(str(Path(args.state_dir) / "fly-api.sock"))
    server = VaultServer(options, token, attestor)
    listener = await server.start()
    host, port = listener.address
    # Handlers first: whoever waits on the ready file may signal us at once.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = Path(args.ready_file)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "host": host,
                "port": port,
                "issuer_base_url": issuer_base_url,
                "machine_id": machine_id,
                "mode": "vm" if args.vm else "host",
                "data_dir": str(server_data),
            }
        )
    )
    os.replace(tmp, ready)
    await stop.wait()
    await server.shutdown()
    await attestor.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--state-dir", required=True)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--ready-file", required=True)
    serve.add_argument("--access-token-fd", type=int, required=True)
    serve.add_argument("--vm", action="store_true")
    serve.add_argument("--name", default="local")
    serve.add_argument("--memory-max", type=int)
    serve.add_argument("--cpu-max", type=float)
    args = parser.parse_args(argv)
    return _serve(args)


if __name__ == "__main__":
    raise SystemExit(main())
