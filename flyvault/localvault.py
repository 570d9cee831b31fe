"""The local dev vault: fly-vault-init on 127.0.0.1 with local stand-ins for Fly.

``fly-vault local up`` starts ``python -m flyvault.localvault serve`` as a detached process,
the vault's supervisor. It runs the OIDC issuer stand-in and the ``/.fly/api`` socket
stand-in, and starts the very init server a Fly Machine runs (``fly-vault-init``, found
through its console-script entry point) as its child: host mode by default (commands run as
the current user, no rootfs), vm mode with ``--rootfs``. The access token reaches init over a
pipe inherited from ``up`` (``--access-token-fd``), never the environment. Once init wrote its
ready file, the supervisor writes its own (address, issuer, machine id); ``up`` waits for
that, then adds or updates ``[vault.local]`` in the config: address, a fresh access token and
the development issuer override, keeping every other entry and any keys the user added to this
one (``forward``, say). ``down`` sends the supervisor SIGTERM; it passes it on to init, which
ends its sessions and stops the workload, and leaves when init has.

The client side never imports the server: init is a process here as on Fly
(references/architecture.md).

State lives under ``<XDG data dir>/fly-vault/local/``: ``state.json`` (pids, address,
issuer), ``init.log`` (the supervisor's and init's log), the server's data dir and the API
socket.
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

from flyvault.defaults import LOCAL_APP, LOCAL_ORG
from flyvault.errors import ConfigError, VaultError
from flyvault.paths import data_dir

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
    #: fly-vault-init, the supervisor's child (None in a state file from before it had one).
    init_pid: int | None = None


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
    token = secrets.token_urlsafe(32)
    # The token goes over a pipe, never the environment (which /proc exposes).
    token_fd = _token_pipe(token)
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
            _kill_group(process.pid)
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
        init_pid=info.get("init_pid"),
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


def _token_pipe(token: str) -> int:
    """A pipe's read end holding ``token``, for ``--access-token-fd`` of the child."""
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode("utf-8"))  # far below the pipe buffer size
    os.close(write_end)
    return read_end


def stop_process(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not _is_our_process(pid) or _reaped(pid):
            return
        time.sleep(0.05)
    _kill_group(pid)


def _kill_group(pid: int) -> None:
    """SIGKILL the supervisor and init with it: the supervisor leads their process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
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


# The supervisor process ------------------------------------------------------------------

#: What the supervisor runs when the entry point cannot be looked up (a source tree that was
#: never installed).
_INIT_MODULE_FALLBACK = "flyvault.server.main"
#: Init's own settings from the environment: the local vault sets each of these by flag or
#: wants none of them (``VAULT_FIREWALL`` would firewall this machine).
_INIT_SETTINGS_PREFIX = "VAULT_"


def init_command() -> list[str]:
    """How to start fly-vault-init with this Python: the module its console script names."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="console_scripts", name="fly-vault-init"):
        return [sys.executable, "-m", entry.module]
    return [sys.executable, "-m", _INIT_MODULE_FALLBACK]


def _init_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_INIT_SETTINGS_PREFIX)
        and key not in ("ACCESS_TOKEN", "FLY_API_SOCKET")
    }


def _serve(args: argparse.Namespace) -> int:
    import logging

    from flyvault.standins.flyapi import FlyApiSocket, MachineIdentity
    from flyvault.standins.oidc import OidcIssuer

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from flyvault.redact import install_log_filter

    install_log_filter()
    log = logging.getLogger("flyvault.localvault")
    base = Path(args.state_dir)
    server_data = base / "data"
    server_data.mkdir(parents=True, exist_ok=True)
    init_ready = base / "init-ready.json"
    init_ready.unlink(missing_ok=True)
    identity = MachineIdentity.default(LOCAL_ORG, LOCAL_APP, region="local")
    socket_path = base / "fly-api.sock"

    # Handlers first: whoever waits on the ready file may signal us at once. A stop is passed
    # on to init, which ends its sessions and stops the workload; we leave when it has.
    stopping = False
    init: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if init is not None:
            init.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with OidcIssuer() as issuer, FlyApiSocket(socket_path, issuer, identity):
        command = [
            *init_command(),
            "--listen",
            f"127.0.0.1:{args.port}",
            "--data-dir",
            str(server_data),
            "--fly-api-socket",
            str(socket_path),
            "--hostname",
            args.name,
            "--ready-file",
            str(init_ready),
            "--access-token-fd",
            str(args.access_token_fd),
            "--log-format",
            "text",
            "--log-level",
            "info",
            *(() if args.vm else ("--host-mode",)),
            *(("--memory-max", str(args.memory_max)) if args.memory_max is not None else ()),
            *(("--cpu-max", repr(args.cpu_max)) if args.cpu_max is not None else ()),
        ]
        # Init's output goes where ours goes (init.log); it stays in our process group, so a
        # last-resort SIGKILL of the group (``stop_process``) takes it along.
        init = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            env=_init_environment(),
            pass_fds=(args.access_token_fd,),
        )
        os.close(args.access_token_fd)
        if stopping:  # a signal that came before ``init`` was set
            init.send_signal(signal.SIGTERM)
        log.info("started fly-vault-init (pid %d): %s", init.pid, " ".join(command))
        while not init_ready.exists() and init.poll() is None and not stopping:
            time.sleep(0.05)
        if init.poll() is None and not stopping:
            _write_ready(args, init.pid, init_ready, issuer.base_url, identity.machine_id)
        code = init.wait()
        log.info("fly-vault-init (pid %d) exited with code %d", init.pid, code)
    init_ready.unlink(missing_ok=True)
    return code


def _write_ready(
    args: argparse.Namespace, init_pid: int, init_ready: Path, issuer_base_url: str, machine: str
) -> None:
    """``ready.json`` for ``up``: init's bound address, and what the client must be told."""
    bound = json.loads(init_ready.read_text())
    ready = Path(args.ready_file)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "host": bound["host"],
                "port": bound["port"],
                "issuer_base_url": issuer_base_url,
                "machine_id": machine,
                "mode": "vm" if args.vm else "host",
                "data_dir": str(Path(args.state_dir) / "data"),
                "init_pid": init_pid,
            }
        )
    )
    os.replace(tmp, ready)


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
