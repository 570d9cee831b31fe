"""Shared plumbing of the reliability suites (r4_drops, r5_fuzz, r8_concurrency,
p7_conn_memory): a private init on 127.0.0.1 with the local Fly stand-ins, /proc memory
readings, percentiles and the results file.

Everything here is bounded: the init is started by this process, recorded by PID and
stopped by that PID (SIGTERM, then SIGKILL after 5 s); nothing is killed by name.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ORG = "rel-org"
APP = "rel-app"
TOKEN = "reliability-access-token-0123456789abcdef"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize, VmPeak, RssAnon, Threads of ``pid`` (kB values in bytes)."""
    wanted = {"VmRSS", "VmHWM", "VmSize", "VmPeak", "RssAnon", "Threads"}
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                parts = value.split()
                number = int(parts[0])
                out[key] = number * 1024 if len(parts) > 1 and parts[1] == "kB" else number
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (its own, not its children's)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(samples: Sequence[float]) -> dict[str, Any]:
    """Seconds in, milliseconds out."""
    if not samples:
        return {"n": 0}
    ms = [s * 1000 for s in samples]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(sum(ms) / len(ms), 3),
        "min": round(min(ms), 3),
        "max": round(max(ms), 3),
    }


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = run("status", "--porcelain")
    return {
        "sha": run("rev-parse", "--short", "HEAD"),
        "dirty_files": len((dirty or "").splitlines()),
    }


def machine_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }


def write_results(prefix: str, data: dict[str, Any], out: str | None = None) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%S")
    sha = git_info()["sha"] or "nogit"
    path = Path(out) if out else RESULTS / f"{prefix}-{stamp}-{sha}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"git": git_info(), "machine": machine_info(), **data}
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def vault_config(port: int, issuer_url: str, *, host: str = "127.0.0.1", name: str = "rel") -> Any:
    from flyvault.config import VaultConfig

    return VaultConfig(
        name=name,
        address=f"{host}:{port}",
        org=ORG,
        app=APP,
        access_token=TOKEN,
        oidc_issuer_url=issuer_url,
    )


@dataclass
class RunningInit:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> int | None:
        """SIGTERM by PID, SIGKILL after 5 s. Returns the exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
        return self.process.wait(timeout=5)


def start_init(
    workdir: Path,
    api_socket: Path,
    *,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    log_level: str = "warning",
) -> RunningInit:
    """Start ``python -m server.main --host-mode`` and wait (20 s at most) until it listens."""
    data_dir = workdir / "init-data"
    data_dir.mkdir(exist_ok=True)
    ready = workdir / "init-ready.json"
    ready.unlink(missing_ok=True)
    log = workdir / "init.log"
    environment = dict(os.environ if env is None else env)
    environment["ACCESS_TOKEN"] = TOKEN
    command = [
        sys.executable,
        "-m",
        "flyvault.server.main",
        "--listen",
        listen,
        "--data-dir",
        str(data_dir),
        "--fly-api-socket",
        str(api_socket),
        "--ready-file",
        str(ready),
        "--host-mode",
        "--log-level",
        log_level,
        *extra_args,
    ]
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            command, env=environment, stdout=sink, stderr=sink, cwd=REPO, stdin=subprocess.DEVNULL
        )
    deadline = time.monotonic() + 20
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            raise RuntimeError(f"init did not start: {log.read_text()[-4000:]}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    return RunningInit(process, info["host"], info["port"], log)


@dataclass
class Harness:
    workdir: Path
    issuer_url: str
    api_socket: Path
    issuer: Any


@contextlib.contextmanager
def harness(keep: bool = False) -> Iterator[Harness]:
    """A temporary directory with private XDG dirs, the OIDC issuer and the Fly API socket.

    The XDG variables of this process point into the directory (the client's attestation
    cache lives there), and are restored afterwards.
    """
    from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer

    saved = {
        k: os.environ.get(k)
        for k in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")
    }
    tmp = Path(tempfile.mkdtemp(prefix="fvrel-"))
    try:
        for variable in saved:
            path = tmp / variable.lower()
            path.mkdir()
            os.environ[variable] = str(path)
        with (
            OidcIssuer() as issuer,
            FlyApiSocket(tmp / "fly.sock", issuer, MachineIdentity.default(ORG, APP)) as api,
        ):
            yield Harness(tmp, issuer.base_url, api.path, issuer)
    finally:
        for variable, value in saved.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
        if not keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
