"""``fly-vault`` entry point.

Imports are lazy on purpose: ``--help``, usage errors and config errors must not load QUIC
or crypto (a cold Python CLI spends most of its start-up importing them, and ``exec`` has
to beat ``ssh host true``). Each command's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flyvault.defaults import RECONNECT_TIMEOUT as RECONNECT_TIMEOUT_DEFAULT
from flyvault.envvars import number

#: argparse types of numeric flags: a bad value is a usage error naming the flag (exit 2).
RECONNECT_TIMEOUT = number(float, minimum=0, unit="seconds")
PORT_OR_ANY = number(int, minimum=0, maximum=65535)
PORT = number(int, minimum=1, maximum=65535)

EXIT_CODES_HELP = """\
exit codes:
  0   success (exec/connect: the remote command's own code, 0-255; 127 command not
      found, 126 not executable; 255 fly-vault failed)
  1   other fly-vault error          2   usage error (bad flag or argument)
  3   config error                   4   vault unreachable / connection lost
  5   attestation failed (token not sent)
  6   access token refused           7   protocol error
  8   provisioning failed            9   not found (e.g. exec session)
  10  other error reported by the vault
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fly-vault",
        description="Attested remote development VMs on Fly.io.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-file",
        default=os.environ.get("FLY_VAULT_LOG_FILE"),
        help="also write debug logs (JSON lines with timestamps, no secrets) to this file, "
        "truncated at start; its directory must exist (env FLY_VAULT_LOG_FILE)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log each step (config, handshake, attestation, authentication, reconnects) "
        "with timings to stderr",
    )
    parser.add_argument(
        "--no-mux",
        action="store_true",
        help="connect directly instead of through the vault's connection keeper (env "
        "FLY_VAULT_MUX=0; config key mux = false)",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = commands.add_parser(
        "doctor",
        help="check a vault step by step: config, QUIC, attestation, access token, keeper",
        description="Check a vault step by step with a fresh connection and say what to fix. "
        "The exit code names the failed step (3 config, 4 unreachable, 5 attestation, "
        "6 token, 7 protocol). Then the vault's connection keeper, if one runs, is asked for "
        "its status and a PING over its connection; that step never changes the exit code.",
    )
    doctor.add_argument("vault", help="name of a [vault.NAME] entry in the config")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument(
        "--no-mux",
        action="store_true",
        default=argparse.SUPPRESS,  # absent: the global flag's value stands
        help="as the global flag: report the vault's connection keeper as off",
    )
    doctor.set_defaults(run=_lazy("flyvault.cli.doctor", "run"))

    remote = "flyvault.cli.remote"
    reconnect_help = (
        "give up after the connection has been lost this many seconds (default %(default)s)"
    )
    exec_ = commands.add_parser(
        "exec",
        help="run a command on a vault (or reattach to a named session)",
        description="Run a command on the vault and exit with its status (128+N if it died "
        "from signal N; 255 if fly-vault itself failed). A PTY is used when stdin is a "
        "terminal, otherwise pipes with stdout and stderr kept apart. Put the command after "
        "'--'. The command keeps running if the connection drops; the client reconnects and "
        "replays exactly the output it missed.",
    )
    exec_.add_argument("vault")
    exec_.add_argument("argv", nargs="*", metavar="-- COMMAND [ARGS...]", help=argparse.SUPPRESS)
    exec_.add_argument(
        "--session",
        metavar="ID",
        help="name the session: creates it, or reattaches when it exists; without a command, "
        "only reattaches",
    )
    exec_.add_argument(
        "--from-start",
        action="store_true",
        help="with --session: replay all the output the vault holds, not only what this "
        "machine has not shown yet",
    )
    exec_.add_argument("--context", metavar="TEXT", help="why this runs (shown by list-exec)")
    tty_group = exec_.add_mutually_exclusive_group()
    tty_group.add_argument(
        "-t", "--tty", dest="tty", action="store_true", default=None, help="force a PTY"
    )
    tty_group.add_argument(
        "-T",
        "--no-tty",
        dest="tty",
        action="store_false",
        help="never use a PTY (pipes, stderr kept apart)",
    )
    exec_.add_argument(
        "--user",
        "-u",
        metavar="USER",
        help="run as this account of the vault's /etc/passwd (default root), with its groups, "
        "home and login variables",
    )
    exec_.add_argument(
        "--cwd",
        metavar="DIR",
        help="working directory on the vault, an absolute path that must exist (default: the "
        "user's home)",
    )
    exec_.add_argument(
        "--env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="set an environment variable over the login's (repeatable)",
    )
    exec_.add_argument(
        "--reconnect-timeout",
        type=RECONNECT_TIMEOUT,
        default=RECONNECT_TIMEOUT_DEFAULT,
        metavar="SECONDS",
        help=reconnect_help,
    )
    exec_.set_defaults(run=_lazy(remote, "run_exec"))

    connect = commands.add_parser(
        "connect",
        help="open an interactive shell on a vault (with optional port forwards)",
        description="Open a login shell (bash -l, else sh -l) in a PTY. Type ~. after a "
        "newline to leave a hung session, ~? for help. Exits with the shell's status, or 255 "
        "when fly-vault failed or the vault went away.",
    )
    connect.add_argument("vault")
    connect.add_argument(
        "--forward",
        "-L",
        metavar="L:HOST:R",
        action="append",
        default=[],
        help="forward local port L to HOST:R as seen from the vault "
        "(repeatable; added to the config's forward list)",
    )
    connect.add_argument(
        "--reconnect-timeout",
        type=RECONNECT_TIMEOUT,
        default=RECONNECT_TIMEOUT_DEFAULT,
        metavar="SECONDS",
        help=reconnect_help,
    )
    connect.add_argument(
        "--reprovision",
        action="store_true",
        help="first replace the vault's rootfs with the configured rootfs or rootfs_url "
        "(keeps /root and /home; stops every process on the vault)",
    )
    connect.add_argument(
        "--user",
        "-u",
        metavar="USER",
        help="log in as this account of the vault's /etc/passwd (default root): its shell, "
        "home and groups",
    )
    _rootfs_options(connect)
    connect.set_defaults(run=_lazy(remote, "run_connect"))

    forward = commands.add_parser(
        "forward",
        help="forward local ports to the vault without a shell (or --stdio, for ssh)",
        usage="%(prog)s VAULT L:HOST:R [L:HOST:R ...]\n       %(prog)s --stdio VAULT HOST:PORT",
        description="Listen on 127.0.0.1 and tunnel each connection to HOST:R as seen from "
        "the vault. Listeners stay bound across reconnects. Runs until Ctrl-C. With --stdio, "
        "join standard input and output to one TCP connection to HOST:PORT opened on the "
        "vault instead (like ssh -W), for an ssh ProxyCommand: see 'fly-vault ssh-config'.",
    )
    forward.add_argument(
        "--stdio",
        action="store_true",
        help="pipe stdin/stdout to HOST:PORT on the vault; exits 0 when both sides closed",
    )
    forward.add_argument("vault")
    forward.add_argument("specs", nargs="+", metavar="L:HOST:R")
    forward.set_defaults(run=_run_forward)

    ssh_config = commands.add_parser(
        "ssh-config",
        help="print a Host block for ~/.ssh/config that reaches the vault's sshd",
        description="Print a Host block for ~/.ssh/config whose ProxyCommand is 'fly-vault "
        "forward --stdio VAULT localhost:PORT' (by absolute path), so ssh, scp, rsync, git "
        "and VS Code Remote-SSH reach an sshd running inside the vault through the attested "
        "channel. Does not connect.",
    )
    ssh_config.add_argument("vault", help="name of a [vault.NAME] entry in the config")
    ssh_config.add_argument("--user", default="root", help="login name (default root)")
    ssh_config.add_argument(
        "--port", type=PORT, default=22, help="the sshd's port on the vault (default 22)"
    )
    ssh_config.add_argument(
        "--host-alias", metavar="NAME", help="the name to type after ssh (default: VAULT)"
    )
    ssh_config.set_defaults(run=_lazy("flyvault.cli.sshconfig", "run"))

    reprovision = commands.add_parser(
        "reprovision",
        help="replace the vault's rootfs, keeping /root and /home",
        description="Send the configured rootfs (or have the vault fetch rootfs_url) and swap "
        "it in atomically: the old rootfs comes back if the new one does not start. /root "
        "and /home are kept; every process on the vault is stopped. Returns once the new "
        "workload runs, with the time it took. Asks for confirmation on a terminal.",
    )
    reprovision.add_argument("vault")
    reprovision.add_argument("--yes", "-y", action="store_true", help="do not ask")
    _rootfs_options(reprovision)
    reprovision.set_defaults(run=_lazy(remote, "run_reprovision"))

    restart = commands.add_parser(
        "restart",
        help="restart the vault's workload (same rootfs; every session ends)",
        description="Stops the workload (its init and every process) and starts it again "
        "on the same rootfs, then waits until the vault reports a new boot id (and, under "
        "systemd, until the system is running or degraded). Refused while sessions run, "
        "unless --yes.",
    )
    restart.add_argument("vault")
    restart.add_argument("--yes", "-y", action="store_true", help="even if sessions run")
    restart.add_argument("--json", action="store_true", help="print JSON")
    restart.add_argument(
        "--timeout",
        type=number(float, minimum=1, maximum=3600, unit="seconds"),
        default=300.0,
        metavar="SECONDS",
        help="how long the restart may take (default 300)",
    )
    restart.set_defaults(run=_lazy("flyvault.cli.restart", "run"))

    cp = commands.add_parser(
        "cp",
        help="copy files and trees to or from a vault (scp's syntax)",
        usage="fly-vault cp [-r] [-p] [-L] [--user USER] [--json] SRC... DST",
        description="Copy between this machine and a vault: a remote path is VAULT:PATH, "
        "'-' is standard input or output (one file, or a tar stream with -r). An existing "
        "directory DST receives the sources under their names; any other DST is the new name "
        "of the one SRC. Every file lands atomically and is verified by SHA-256; a large file "
        "resumes after a dropped connection. What a vault sends is checked as strictly as an "
        "archive: '..', absolute names, paths through symlinks, device nodes and setuid bits "
        "(unless -p as root) are refused.",
    )
    cp.add_argument("paths", nargs="+", metavar="PATH", help="SRC... DST")
    cp.add_argument(
        "-r",
        "-R",
        "--recursive",
        dest="recursive",
        action="store_true",
        help="copy directories recursively (as one stream)",
    )
    cp.add_argument(
        "-p",
        "--preserve",
        dest="preserve",
        action="store_true",
        help="keep modes and modification times (owners too when the receiving side is root)",
    )
    cp.add_argument(
        "-L",
        "--dereference",
        dest="follow_symlinks",
        action="store_true",
        help="follow symlinks inside trees (by default they are copied as symlinks)",
    )
    cp.add_argument("--user", metavar="USER", help="act as this user on the vault (default root)")
    cp.add_argument("--json", action="store_true", help="print a JSON summary")
    cp.add_argument(
        "--reconnect-timeout",
        type=RECONNECT_TIMEOUT,
        default=RECONNECT_TIMEOUT_DEFAULT,
        metavar="SECONDS",
        help=reconnect_help,
    )
    cp.set_defaults(run=_lazy("flyvault.cli.cp", "run"))

    from flyvault.cli.deploy import add_parser as add_deploy_parser
    from flyvault.cli.images import add_parser as add_image_parser

    add_deploy_parser(commands)
    add_image_parser(commands)

    mux = commands.add_parser(
        "mux",
        help="the connection keepers: status, stop",
        description="exec, list-exec and kill reuse a per-vault background connection (the "
        "keeper), started by the first call and ended after mux_idle seconds without a "
        "request.",
    )
    mux_commands = mux.add_subparsers(dest="mux_command", metavar="ACTION", required=True)
    mux_status = mux_commands.add_parser("status", help="list the running keepers")
    mux_status.add_argument("vault", nargs="?", help="only this vault's keeper")
    mux_status.add_argument("--json", action="store_true", help="print JSON")
    mux_stop = mux_commands.add_parser("stop", help="stop the keepers (their connections close)")
    mux_stop.add_argument("vault", nargs="?", help="only this vault's keeper")
    mux.set_defaults(run=_lazy("flyvault.cli.mux", "run"))

    list_exec = commands.add_parser("list-exec", help="list the vault's exec sessions")
    list_exec.add_argument("vault")
    list_exec.add_argument("--json", action="store_true", help="print JSON")
    list_exec.set_defaults(run=_lazy(remote, "run_list_exec"))

    kill = commands.add_parser("kill", help="send a signal to an exec session")
    kill.add_argument("vault")
    kill.add_argument("session")
    kill.add_argument("--signal", "-s", default="TERM", help="name or number (default TERM)")
    kill.add_argument(
        "--wait",
        type=number(float, minimum=0, maximum=60, unit="seconds"),
        default=2.0,
        metavar="SECONDS",
        help="wait this long for the session to end and say whether it did (default 2; 0: "
        "do not wait)",
    )
    kill.set_defaults(run=_lazy(remote, "run_kill"))

    local = commands.add_parser(
        "local",
        help="run a local dev vault on 127.0.0.1 (the embedded default)",
        description="Start, stop or inspect the local dev vault: an init server on "
        "127.0.0.1 with local stand-ins for Fly's OIDC issuer and API socket. 'up' adds "
        "[vault.local] to the config without touching other entries.",
    )
    local_commands = local.add_subparsers(dest="local_command", metavar="ACTION", required=True)
    up = local_commands.add_parser("up", help="start the local vault (idempotent)")
    up.add_argument("--port", type=PORT_OR_ANY, default=0, help="UDP port (default: any free port)")
    up.add_argument("--name", default="local", help="config entry name (default: local)")
    up.add_argument(
        "--rootfs",
        type=Path,
        metavar="TAR.GZ",
        help="as root: run this rootfs in its own namespaces (vm mode), as on a Fly Machine",
    )
    _rootfs_options(up, saved=True)
    up.add_argument(
        "--memory-max",
        type=_memory_size,
        metavar="SIZE",
        help="with --rootfs: limit the workload's memory, sessions included, e.g. 2G",
    )
    up.add_argument(
        "--cpu-max",
        type=number(float, minimum=0.01, maximum=4096, unit="CPUs"),
        metavar="CPUS",
        help="with --rootfs: limit the workload's CPU time, in CPUs, e.g. 1.5",
    )
    local_commands.add_parser("down", help="stop the local vault")
    status = local_commands.add_parser("status", help="is it running, where, in which mode")
    status.add_argument("--json", action="store_true")
    local.set_defaults(run=_lazy("flyvault.cli.local", "run"))

    build = commands.add_parser(
        "build",
        help="write a Docker build context for deploying a vault on Fly",
        description="Write a directory with this project's wheel, a Dockerfile that runs "
        "fly-vault-init (with nftables for --firewall), an example fly.toml and a README with "
        "the deploy steps. Needs a source checkout of fly-vault.",
    )
    build.add_argument(
        "--out",
        default="fly-vault-build",
        metavar="DIR",
        help="output directory (default %(default)s)",
    )
    build.add_argument("--force", action="store_true", help="replace DIR even when it is not empty")
    build.set_defaults(run=_lazy("flyvault.cli.build", "run"))

    skills = commands.add_parser(
        "skills",
        help="install the agent skills (remote-vm, remote-task, vault-admin)",
        description="Copy fly-vault's agent skills, with the references they link, into an "
        "agent's skills directory: claude = ~/.claude/skills, codex = $CODEX_HOME/skills "
        "(~/.codex/skills), agents = ~/.agents/skills (the default), or any DIR. Each skill "
        "is replaced atomically; a skill changed since it was installed is kept unless "
        "--force.",
    )
    skills_commands = skills.add_subparsers(dest="skills_command", metavar="ACTION", required=True)
    install = skills_commands.add_parser("install", help="install or update the skills")
    install.add_argument(
        "--target", metavar="DIR|claude|codex|agents", help="where to install (default: agents)"
    )
    install.add_argument(
        "--skill", action="append", metavar="NAME", help="only this skill (repeatable)"
    )
    install.add_argument(
        "--force", action="store_true", help="replace skills that were changed after install"
    )
    skills.set_defaults(run=_lazy("flyvault.cli.skills", "run"))
    return parser


def _memory_size(text: str) -> int:
    """argparse type of --memory-max: 512M, 2G, ... at least 4M."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(value[-1:], 1)
    if value[-1:] in units:
        value = value[:-1]
    try:
        size = int(float(value) * factor)
    except (ValueError, OverflowError):
        size = 0
    if not 4 * 1024**2 <= size < 2**63:
        raise argparse.ArgumentTypeError(
            f"expected a size of at least 4M (e.g. 512M, 2G), got {text!r}"
        )
    return size


def _lazy(module: str, attribute: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        function: Callable[[argparse.Namespace], int] = getattr(
            importlib.import_module(module), attribute
        )
        return function(args)

    return run


def _run_forward(args: argparse.Namespace) -> int:
    module = "flyvault.cli.stdio" if args.stdio else "flyvault.cli.remote"
    return _lazy(module, "run" if args.stdio else "run_forward")(args)


def _rootfs_options(command: argparse.ArgumentParser, *, saved: bool = False) -> None:
    """--allow-devices and --max-expansion-ratio: how the vault may unpack the rootfs."""
    where = "saved in the config entry" if saved else "override the config entry"
    command.add_argument(
        "--allow-devices",
        action="store_true",
        default=None,
        help="create the image's device nodes under /dev (refused by default; nodes "
        f"elsewhere are always refused); {where} (rootfs_allow_devices)",
    )
    command.add_argument(
        "--max-expansion-ratio",
        type=int,
        metavar="N",
        help="refuse an archive that unpacks to more than N times its compressed size "
        f"(checked past 64 MiB; the vault's default is 100, 0 = no limit); {where} "
        "(rootfs_max_expansion_ratio)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first "--" is the remote command, verbatim (argv boundaries and
    # leading dashes kept), so it never meets argparse.
    command: list[str] | None = None
    if "--" in arguments:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    args = parser.parse_args(arguments)
    if command is not None:
        if getattr(args, "argv", None) is None:
            parser.error("'--' is only used by exec, before the remote command")
        args.argv = [*args.argv, *command]
    if args.version:
        from flyvault import __version__

        print(f"fly-vault {__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from flyvault.cli.output import configure_logging, report_error
    from flyvault.errors import VaultError
    from flyvault.redact import ScrubbingStream

    # Every line the CLI prints passes the scrubber (the exec/connect session's own output
    # is written to the file descriptors directly and is the user's data, not ours).
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = ScrubbingStream(sys.stdout), ScrubbingStream(sys.stderr)  # type: ignore[assignment]
    try:
        configure_logging(args.log_file, args.verbose)
        code: int = args.run(args)
        return code
    except VaultError as exc:
        report_error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fly-vault: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `fly-vault list-exec | head`: the reader left; that is not an error worth a trace.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, streams[0].fileno())
        return 141
    finally:
        sys.stdout, sys.stderr = streams


def entry() -> None:
    code = main()
    # Leave without the interpreter's teardown: unloading the ~400 modules QUIC and crypto
    # bring costs ~30 ms on every run, longer than the whole remote round trip. Everything
    # that matters is already done: the session's output threads were joined, the
    # connection closed; only the standard streams and log handlers remain to flush.
    import contextlib
    import logging

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    entry()
