#!/usr/bin/env python3
"""``fly-vault cp`` against scp and tar over ssh on one machine, loopback. See bench/README.md.

    sudo .venv/bin/python bench/cp_bench.py [--quick] [--size-mb N] [--files N] [--note TEXT]

The set-up is ``bench.py``'s (imported, not copied): a temporary XDG home with
``fly-vault local up`` (host mode, 127.0.0.1), a throwaway user ``fvbench`` with a key made
for the run, and our own ``sshd`` on a free port. Then, once with the default datagram size
and once with ``FLY_VAULT_DATAGRAM_SIZE=1200`` (the local vault is restarted with the
variable in its environment, so init and the client both use it):

- C1: one large file each way, ``fly-vault cp`` against ``scp``, interleaved rounds;
- C2: a generated tree of small files each way, ``fly-vault cp -r`` against ``scp -r`` and
  ``tar c | ssh tar x`` (``ssh tar c | tar x`` for the download), interleaved rounds;
- C3: VmRSS of the ``fly-vault cp`` process, of init and of init's file workers, sampled
  every 50 ms during every fly-vault copy; peaks with a small and with the large file.

Every copy is verified (SHA-256 of the file, or the tree's manifest of types, sizes and
SHA-256) outside the timed part; a copy that does not match is not counted. Every process is
started here and stopped by its PID; every loop is bounded by a count and a time budget.
Results go to ``bench/results/cp-<UTC date>-<git short sha>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import pwd
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import (  # bench/ is not a package: imported by path
    BENCH_USER,
    FLY_VAULT,
    MB,
    RSS_FLAT_LIMIT_KB,
    VAULT,
    Bench,
    BenchError,
    children_cpu,
    fmt,
    fmt_load,
    git_info,
    machine_info,
    print_summary,
    ratio,
    rss_kb,
    summarize,
    target,
    utc_now,
    versions,
)

DATAGRAM_ENV = "FLY_VAULT_DATAGRAM_SIZE"
#: The two halves of a run: the default datagram size (16,000 bytes on loopback) and the
#: QUIC minimum a remote path uses.
HALVES = (("default", None), ("1200", "1200"))
SAMPLE_INTERVAL = 0.05
TREE_SEED = 14
FILE_SEED = 1414


def _small_mb(size_mb: int) -> int:
    """C3's small file: a tenth of the large one, but on the same path. From DIRECT_FROM on
    a file goes over a connection of the cp's own, which loads QUIC and crypto (~20 MiB) that
    a copy through the keeper never loads: comparing across the two would measure that."""
    from flyvault.client.copy_engine import DIRECT_FROM

    small = max(10, size_mb // 10)
    if size_mb * MB >= DIRECT_FROM:
        small = max(small, -(-DIRECT_FROM // MB))
    return small


# Data ------------------------------------------------------------------------------------


def write_random_file(path: Path, size: int, seed: int) -> str:
    """``size`` seeded pseudo-random bytes (incompressible); returns the SHA-256."""
    digest = hashlib.sha256()
    chunk = 4 << 20
    with open(path, "wb") as out:
        written = 0
        index = 0
        while written < size:
            data = random.Random(seed * 1_000_003 + index).randbytes(min(chunk, size - written))
            out.write(data)
            digest.update(data)
            written += len(data)
            index += 1
    os.chmod(path, 0o644)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_tree(root: Path, files: int, total_bytes: int, seed: int) -> dict[str, Any]:
    """A deterministic source tree: ``files`` regular files spread over nested directories
    (10 top-level, 10 below each, and a few at the top), sizes log-uniform between 64 B and
    64 KiB scaled to ``total_bytes`` in all, a fifth of them text-like, some executable."""
    rng = random.Random(seed)
    raw = [math.exp(rng.uniform(math.log(64), math.log(65536))) for _ in range(files)]
    scale = total_bytes / sum(raw)
    sizes = [max(0, int(x * scale)) for x in raw]
    sizes[0] += total_bytes - sum(sizes)  # exactly total_bytes
    root.mkdir(mode=0o755)
    dirs = [root]
    for a in range(10):
        top = root / f"pkg{a:02d}"
        top.mkdir(mode=0o755)
        dirs.append(top)
        for b in range(10):
            sub = top / f"mod{b:02d}"
            sub.mkdir(mode=0o755)
            dirs.append(sub)
    words = [b"def", b"return", b"self", b"import", b"value", b"class", b"if", b"for", b"in"]
    for i, size in enumerate(sizes):
        where = dirs[i % len(dirs)]
        path = where / f"f{i:05d}.{'py' if i % 5 == 0 else 'bin'}"
        if i % 5 == 0:
            line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
            data = (line * (size // len(line) + 1))[:size]
        else:
            data = rng.randbytes(size)
        path.write_bytes(data)
        os.chmod(path, 0o755 if i % 17 == 0 else 0o644)
    return {"files": files, "dirs": len(dirs), "bytes": total_bytes, "seed": seed}


def tree_manifest(root: Path) -> dict[str, tuple[Any, ...]]:
    """relative path -> ("d",) or ("f", size, sha256) or ("l", target), for comparing trees."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("l", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("d",)
            elif path.is_file():
                out[rel] = ("f", path.stat().st_size, file_sha256(path))
            else:
                out[rel] = ("?",)
    return out


def filesystem_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on (the longest mount point above it)."""
    best, kind = "", "unknown"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, kind = point, fields[2]
    return kind


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# RSS sampling ----------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = child_pids(pid)
    while todo and len(found) < 1000:
        child = todo.pop()
        found.append(child)
        todo += child_pids(child)
    return found


class RssSampler:
    """VmRSS every 50 ms of the client process, of init and of each of init's descendants
    (the forked file workers). Peaks in kB; ``init_plus_workers`` counts pages a worker
    shares with init (it is forked from init) twice, so it overstates what they use."""

    def __init__(self, client_pid: int, init_pid: int | None) -> None:
        self.client_pid = client_pid
        self.init_pid = init_pid
        self.peaks = {"client": 0, "init": 0, "worker_max": 0, "init_plus_workers": 0}
        self.samples = 0
        self.workers_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_INTERVAL):
                return

    def sample(self) -> None:
        client = rss_kb(self.client_pid) or 0
        init = rss_kb(self.init_pid) or 0 if self.init_pid else 0
        workers = []
        if self.init_pid:
            for pid in descendants(self.init_pid):
                value = rss_kb(pid)
                if value:
                    workers.append(value)
                    self.workers_seen.add(pid)
        peaks = self.peaks
        peaks["client"] = max(peaks["client"], client)
        peaks["init"] = max(peaks["init"], init)
        peaks["worker_max"] = max(peaks["worker_max"], max(workers, default=0))
        peaks["init_plus_workers"] = max(peaks["init_plus_workers"], init + sum(workers))
        self.samples += 1


# The benchmark ---------------------------------------------------------------------------


class CpBench(Bench):
    results_prefix = "cp-"

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.size_mb: int = args.size_mb or (200 if args.quick else 1000)
        self.small_mb: int = _small_mb(self.size_mb)
        self.files: int = args.files or (2000 if args.quick else 10000)
        # ~100 MB for 10,000 files: 10 kB a file on average.
        self.tree_bytes: int = args.tree_mb * MB if args.tree_mb else self.files * 10_000
        self.rounds: int = args.rounds or (2 if args.quick else 3)
        self.base_env: dict[str, str] = {}
        self.init_pid: int | None = None
        self.data = self.tmp / "data"
        self.remote = self.tmp / "remote"  # upload destinations ("the far side")
        self.local = self.tmp / "local"  # download destinations
        self.hashes: dict[str, str] = {}
        self.manifest: dict[str, tuple[Any, ...]] = {}

    # Set-up ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        t0 = time.monotonic()
        for path in (self.data, self.remote, self.local):
            path.mkdir(mode=0o755)
        entry = pwd.getpwnam(BENCH_USER)
        os.chown(self.remote, entry.pw_uid, entry.pw_gid)
        self.hashes["large"] = write_random_file(
            self.data / "large.bin", self.size_mb * MB, FILE_SEED
        )
        self.hashes["small"] = write_random_file(
            self.data / "small.bin", self.small_mb * MB, FILE_SEED + 1
        )
        tree = make_tree(self.data / "tree", self.files, self.tree_bytes, TREE_SEED)
        self.manifest = tree_manifest(self.data / "tree")
        self.results["setup"]["data"] = {
            "large_file_bytes": self.size_mb * MB,
            "small_file_bytes": self.small_mb * MB,
            "tree": tree,
            "generated_in_s": round(time.monotonic() - t0, 1),
        }

    def start_half(self, label: str, datagram: str | None) -> dict[str, Any]:
        """(Re)start the local vault with the half's environment and warm every path up."""
        self.stop_vault()
        group = self.groups.pop("vault", None)
        if group is not None:
            group.remove()
        self.vault_up = False
        self.env = dict(self.base_env)
        if datagram is not None:
            self.env[DATAGRAM_ENV] = datagram
        self.start_vault()
        status = json.loads(
            subprocess.run(
                [FLY_VAULT, "local", "status", "--json"],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.env,
                check=True,
            ).stdout
        )
        self.init_pid = status.get("init_pid") or next(iter(child_pids(self.vault_pid or 0)), None)
        info: dict[str, Any] = {
            "supervisor_pid": self.vault_pid,
            "init_pid": self.init_pid,
            "datagram_env": datagram,
        }
        # Check that init really has the variable (or does not).
        try:
            environ = Path(f"/proc/{self.init_pid}/environ").read_bytes().split(b"\0")
            info["init_env_datagram"] = next(
                (
                    e.split(b"=", 1)[1].decode()
                    for e in environ
                    if e.startswith(DATAGRAM_ENV.encode() + b"=")
                ),
                None,
            )
        except OSError as exc:
            info["init_env_datagram"] = f"unreadable: {exc}"
        if info["init_env_datagram"] != datagram:
            raise BenchError(
                f"init's {DATAGRAM_ENV} is {info['init_env_datagram']!r}, wanted {datagram!r}"
            )
        # Warm-up, not recorded: compiles into the run's pycache, warms sshd and the page cache.
        warm = self.tmp / "warm.txt"
        warm.write_text("warm\n")
        os.chmod(warm, 0o644)
        for argv in (
            [FLY_VAULT, "cp", str(warm), f"{VAULT}:{self.remote}/warm-fv"],
            [FLY_VAULT, "cp", f"{VAULT}:{warm}", str(self.local / "warm-fv")],
            self.scp(str(warm), f"{BENCH_USER}@127.0.0.1:{self.remote}/warm-scp"),
        ):
            for _ in range(2):
                result = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
                if result.returncode != 0:
                    raise BenchError(
                        f"warm-up {' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
                    )
        for path in list(self.remote.iterdir()) + list(self.local.iterdir()):
            if "-tree-" not in path.name:  # trees stay to the end: see tree_copy
                remove(path)
        for path in (self.data / "large.bin", self.data / "small.bin"):
            file_sha256(path)  # into the page cache, for every variant alike
        info["init_rss_at_rest_kb"] = rss_kb(self.init_pid) if self.init_pid else None
        return info

    def scp(self, *args: str) -> list[str]:
        return ["scp", "-F", str(self.ssh_config), "-P", str(self.ssh_port), *args]

    # One copy ----------------------------------------------------------------------------

    def copy(self, argv: list[str], server: str, sample: bool, timeout: float) -> dict[str, Any]:
        """Run one copy to completion: wall time, client and server CPU, RSS peaks."""
        server_cpu = self.vault_cpu if server == "vault" else self.sshd_cpu
        s0 = server_cpu()
        c0 = children_cpu()
        t0 = time.perf_counter()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
        )
        sampler = RssSampler(process.pid, self.init_pid) if sample else None
        try:
            if sampler is not None:
                with sampler:
                    out, err = process.communicate(timeout=timeout)
            else:
                out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"timed out after {timeout:g} s: {' '.join(argv)}") from None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        wall = time.perf_counter() - t0
        result: dict[str, Any] = {
            "wall_s": wall,
            "client_cpu_s": children_cpu() - c0,
            "server_cpu_s": server_cpu() - s0,
            "exit": process.returncode,
        }
        if process.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} exited {process.returncode}: "
                f"{err.decode('utf-8', 'replace').strip()[-1000:]}"
            )
        if argv[:2] == [FLY_VAULT, "cp"] and b"{" in out:
            with contextlib.suppress(ValueError):
                result["summary"] = json.loads(out.decode().strip().splitlines()[-1])
        if sampler is not None:
            result["rss_peak_kb"] = dict(sampler.peaks)
            result["rss_samples"] = sampler.samples
            result["workers_seen"] = len(sampler.workers_seen)
        return result

    # C1 + C3: the large file, and RSS with a small and the large file ---------------------

    def file_variants(self, which: str) -> dict[str, tuple[list[str], str, Path]]:
        src = self.data / f"{which}.bin"
        host = f"{BENCH_USER}@127.0.0.1"
        return {
            "fly_vault_up": (
                [FLY_VAULT, "cp", "--json", str(src), f"{VAULT}:{self.remote}/fv-{which}"],
                "vault",
                self.remote / f"fv-{which}",
            ),
            "scp_up": (
                self.scp(str(src), f"{host}:{self.remote}/scp-{which}"),
                "sshd",
                self.remote / f"scp-{which}",
            ),
            "fly_vault_down": (
                [FLY_VAULT, "cp", "--json", f"{VAULT}:{src}", str(self.local / f"fv-{which}")],
                "vault",
                self.local / f"fv-{which}",
            ),
            "scp_down": (
                self.scp(f"{host}:{src}", str(self.local / f"scp-{which}")),
                "sshd",
                self.local / f"scp-{which}",
            ),
        }

    def file_copy(self, which: str, name: str, spec: tuple[list[str], str, Path]) -> dict[str, Any]:
        argv, server, dest = spec
        remove(dest)
        os.sync()
        size_mb = self.size_mb if which == "large" else self.small_mb
        result = self.copy(argv, server, sample=name.startswith("fly_vault"), timeout=120 + size_mb)
        t0 = time.monotonic()
        got = file_sha256(dest) if dest.exists() else None
        result["verified"] = got == self.hashes[which]
        result["verify_s"] = round(time.monotonic() - t0, 2)
        remove(dest)
        os.sync()
        if not result["verified"]:
            print(f"cp_bench: {name} ({which}): SHA-256 mismatch, not counted", file=sys.stderr)
        return result

    def bench_file(self, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
        # C3 first: the small file once each way (RSS only; the large runs give the other peak).
        small = {
            name: self.file_copy("small", name, spec)
            for name, spec in self.file_variants("small").items()
            if name.startswith("fly_vault")
        }
        variants = self.file_variants("large")
        names = list(variants)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        deadline = time.monotonic() + self.args.budget
        truncated = False
        for i in range(self.rounds):
            if i > 0 and time.monotonic() > deadline:
                truncated = True
                break
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                runs[name].append(self.file_copy("large", name, variants[name]))
                print(
                    f"cp_bench: [{label}] C1 round {i + 1} {name}: {runs[name][-1]['wall_s']:.2f} s",
                    flush=True,
                )
        nbytes = self.size_mb * MB
        metrics: dict[str, Any] = {}
        rates: dict[str, float | None] = {}
        for name, samples in runs.items():
            good = [s for s in samples if s["verified"]]
            metrics[f"{name}_MBps"] = summarize([nbytes / s["wall_s"] / MB for s in good], "MB/s")
            metrics[f"{name}_s"] = summarize([s["wall_s"] for s in good], "s")
            metrics[f"{name}_cpu_pct"] = {
                "client": round(
                    100 * statistics.fmean([s["client_cpu_s"] / s["wall_s"] for s in good]), 1
                )
                if good
                else None,
                "server": round(
                    100 * statistics.fmean([s["server_cpu_s"] / s["wall_s"] for s in good]), 1
                )
                if good
                else None,
            }
            metrics[f"{name}_verify_failures"] = len(samples) - len(good)
            rates[name] = metrics[f"{name}_MBps"]["p50"]
        ratios = {
            "up_fly_vault_over_scp_rate": ratio(rates["fly_vault_up"], rates["scp_up"]),
            "down_fly_vault_over_scp_rate": ratio(rates["fly_vault_down"], rates["scp_down"]),
        }
        c1 = {
            "metrics": metrics,
            "ratios": ratios,
            "targets": [
                target(
                    f"up >= 0.5x scp's rate ({label})",
                    ratios["up_fly_vault_over_scp_rate"],
                    ">=",
                    0.5,
                    "x",
                ),
                target(
                    f"down >= 0.5x scp's rate ({label})",
                    ratios["down_fly_vault_over_scp_rate"],
                    ">=",
                    0.5,
                    "x",
                ),
            ],
            "rounds": self.rounds,
            "truncated_by_time_budget": truncated,
            "bytes": nbytes,
            "runs": runs,
        }
        # C3: peaks with the small file against the highest peak with the large one.
        rss: dict[str, Any] = {}
        c3_targets = []
        for direction in ("up", "down"):
            name = f"fly_vault_{direction}"
            small_peaks = small[name].get("rss_peak_kb", {})
            large_peaks: dict[str, int] = {}
            for s in runs[name]:
                for key, value in s.get("rss_peak_kb", {}).items():
                    large_peaks[key] = max(large_peaks.get(key, 0), value)
            growth = {k: large_peaks.get(k, 0) - small_peaks.get(k, 0) for k in small_peaks}
            rss[direction] = {
                f"peak_kb_{self.small_mb}MB": small_peaks,
                f"peak_kb_{self.size_mb}MB": large_peaks,
                "growth_kb": growth,
                "small_verified": small[name]["verified"],
            }
            for who in ("client", "init", "worker_max"):
                c3_targets.append(
                    target(
                        f"{who} RSS flat {direction} ({label}): peak growth {self.small_mb}->{self.size_mb} MB",
                        growth.get(who),
                        "<=",
                        RSS_FLAT_LIMIT_KB,
                        "kB",
                    )
                )
        c3 = {
            "metrics": {"rss": rss, "sample_interval_s": SAMPLE_INTERVAL},
            "targets": c3_targets,
            "small_runs": small,
        }
        return c1, c3

    # C2: the tree --------------------------------------------------------------------------

    def tree_variants(self, run: str) -> dict[str, tuple[list[str], str, Path]]:
        """Each run copies into names of its own (``run``): see ``tree_copy``."""
        tree = self.data / "tree"
        host = f"{BENCH_USER}@127.0.0.1"
        ssh = " ".join(shlex.quote(a) for a in self.ssh())
        q = shlex.quote
        up_tar = self.remote / f"tar-tree-{run}"
        down_tar = self.local / f"tar-tree-{run}"
        return {
            "fly_vault_up": (
                [
                    FLY_VAULT,
                    "cp",
                    "-r",
                    "--json",
                    str(tree),
                    f"{VAULT}:{self.remote}/fv-tree-{run}",
                ],
                "vault",
                self.remote / f"fv-tree-{run}",
            ),
            "scp_up": (
                self.scp("-r", str(tree), f"{host}:{self.remote}/scp-tree-{run}"),
                "sshd",
                self.remote / f"scp-tree-{run}",
            ),
            "tar_ssh_up": (
                [
                    "bash",
                    "-o",
                    "pipefail",
                    "-c",
                    f"tar -C {q(str(tree))} -cf - . | {ssh} {q(f'mkdir -p {q(str(up_tar))} && tar -C {q(str(up_tar))} -xf -')}",
                ],
                "sshd",
                up_tar,
            ),
            "fly_vault_down": (
                [
                    FLY_VAULT,
                    "cp",
                    "-r",
                    "--json",
                    f"{VAULT}:{tree}",
                    str(self.local / f"fv-tree-{run}"),
                ],
                "vault",
                self.local / f"fv-tree-{run}",
            ),
            "scp_down": (
                self.scp("-r", f"{host}:{tree}", str(self.local / f"scp-tree-{run}")),
                "sshd",
                self.local / f"scp-tree-{run}",
            ),
            "tar_ssh_down": (
                [
                    "bash",
                    "-o",
                    "pipefail",
                    "-c",
                    f"mkdir -p {q(str(down_tar))} && {ssh} {q(f'tar -C {q(str(tree))} -cf - .')} | tar -C {q(str(down_tar))} -xf -",
                ],
                "sshd",
                down_tar,
            ),
        }

    def tree_copy(self, name: str, spec: tuple[list[str], str, Path]) -> dict[str, Any]:
        """Into a new name, and the copy is kept until the end of the bench. Removing it
        would skew the next runs: on ext4 without a journal (this project's CI disk) the
        inode allocator skips inodes freed in the last 30 s (5.5 min while their table
        block is dirty) by reading each one's deletion time, so right after a 10,000-file
        tree was removed, every file created costs ~0.7 ms of system time (perf:
        ``recently_deleted`` in ``ext4_create``), and the tar pipeline took 0.6 s or 7 s
        for the same tree depending on what was deleted before it."""
        argv, server, dest = spec
        os.sync()
        result = self.copy(argv, server, sample=name.startswith("fly_vault"), timeout=600)
        t0 = time.monotonic()
        got = tree_manifest(dest) if dest.is_dir() else {}
        result["verified"] = got == self.manifest
        if not result["verified"]:
            missing = sorted(set(self.manifest) - set(got))
            extra = sorted(set(got) - set(self.manifest))
            differ = sorted(k for k in set(got) & set(self.manifest) if got[k] != self.manifest[k])
            result["verify_detail"] = {
                "missing": missing[:5],
                "missing_n": len(missing),
                "extra": extra[:5],
                "differ": differ[:5],
                "differ_n": len(differ),
            }
            print(
                f"cp_bench: {name} (tree): contents differ, not counted: {result['verify_detail']}",
                file=sys.stderr,
            )
        result["verify_s"] = round(time.monotonic() - t0, 2)
        os.sync()
        return result

    def bench_tree(self, label: str) -> dict[str, Any]:
        names = list(self.tree_variants(label))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        deadline = time.monotonic() + self.args.budget
        truncated = False
        for i in range(self.rounds):
            if i > 0 and time.monotonic() > deadline:
                truncated = True
                break
            variants = self.tree_variants(f"{label}-{i}")
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                runs[name].append(self.tree_copy(name, variants[name]))
                print(
                    f"cp_bench: [{label}] C2 round {i + 1} {name}: {runs[name][-1]['wall_s']:.2f} s",
                    flush=True,
                )
        metrics: dict[str, Any] = {}
        times: dict[str, float | None] = {}
        for name, samples in runs.items():
            good = [s for s in samples if s["verified"]]
            metrics[f"{name}_s"] = summarize([s["wall_s"] for s in good], "s")
            metrics[f"{name}_files_per_s"] = summarize(
                [self.files / s["wall_s"] for s in good], "files/s"
            )
            metrics[f"{name}_cpu_pct"] = {
                "client": round(
                    100 * statistics.fmean([s["client_cpu_s"] / s["wall_s"] for s in good]), 1
                )
                if good
                else None,
                "server": round(
                    100 * statistics.fmean([s["server_cpu_s"] / s["wall_s"] for s in good]), 1
                )
                if good
                else None,
            }
            metrics[f"{name}_verify_failures"] = len(samples) - len(good)
            times[name] = metrics[f"{name}_s"]["p50"]
        ratios = {
            "up_fly_vault_over_tar_ssh_time": ratio(times["fly_vault_up"], times["tar_ssh_up"]),
            "down_fly_vault_over_tar_ssh_time": ratio(
                times["fly_vault_down"], times["tar_ssh_down"]
            ),
            "up_fly_vault_over_scp_r_time": ratio(times["fly_vault_up"], times["scp_up"]),
            "down_fly_vault_over_scp_r_time": ratio(times["fly_vault_down"], times["scp_down"]),
        }
        rss_peaks: dict[str, dict[str, int]] = {}
        for direction in ("up", "down"):
            peaks: dict[str, int] = {}
            for s in runs[f"fly_vault_{direction}"]:
                for key, value in s.get("rss_peak_kb", {}).items():
                    peaks[key] = max(peaks.get(key, 0), value)
            rss_peaks[direction] = peaks
        metrics["fly_vault_rss_peak_kb"] = rss_peaks
        return {
            "metrics": metrics,
            "ratios": ratios,
            "targets": [
                target(
                    f"tree up <= 1.0x tar|ssh time ({label})",
                    ratios["up_fly_vault_over_tar_ssh_time"],
                    "<=",
                    1.0,
                    "x",
                ),
                target(
                    f"tree down <= 1.0x ssh|tar time ({label})",
                    ratios["down_fly_vault_over_tar_ssh_time"],
                    "<=",
                    1.0,
                    "x",
                ),
            ],
            "rounds": self.rounds,
            "truncated_by_time_budget": truncated,
            "tree": self.results["setup"]["data"]["tree"],
            "runs": runs,
        }

    # The run -----------------------------------------------------------------------------

    def run_cp(self, only: list[str], halves: list[tuple[str, str | None]]) -> int:
        failures = 0
        self.base_env = dict(self.env)
        self.base_env.pop(DATAGRAM_ENV, None)
        self.results.update(
            started_at=utc_now(),
            note=self.args.note,
            args={
                "quick": self.quick,
                "only": only,
                "size_mb": self.size_mb,
                "small_mb": self.small_mb,
                "files": self.files,
                "tree_bytes": self.tree_bytes,
                "rounds": self.rounds,
                "budget_s": self.args.budget,
                "pin": self.args.pin,
                "datagram_halves": [label for label, _ in halves],
            },
            git=git_info(),
            machine=machine_info(),
            setup={
                "tmp": str(self.tmp),
                "tmp_filesystem": filesystem_of(self.tmp),
                "pycache_prefix": self.env.get("PYTHONPYCACHEPREFIX"),
            },
        )
        self.results["machine"]["loadavg_start"] = os.getloadavg()
        try:
            self.start_sshd()
            self.results["versions"] = versions()
            self.prepare_data()
            if self.args.pin:
                os.sched_setaffinity(0, {0})
            for label, datagram in halves:
                print(f"cp_bench: datagram size {label}: starting the local vault", flush=True)
                self.results["setup"][f"half_{label}"] = self.start_half(label, datagram)
                steps: list[tuple[str, Any]] = []
                if "C1" in only or "C3" in only:
                    steps.append(("C1", self.bench_file))
                if "C2" in only:
                    steps.append(("C2", self.bench_tree))
                for bench_id, step in steps:
                    key = f"{bench_id}@{label}"
                    print(f"cp_bench: {key} ...", flush=True)
                    t0 = time.monotonic()
                    load0 = os.getloadavg()
                    try:
                        data = step(label)
                    except KeyboardInterrupt as exc:
                        self.record(key, {"error": f"interrupted ({exc})"})
                        raise
                    except Exception as exc:
                        failures += 1
                        data = {
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(),
                        }
                        print(
                            f"cp_bench: {key} failed: {type(exc).__name__}: {exc}", file=sys.stderr
                        )
                    extra = {
                        "elapsed_s": round(time.monotonic() - t0, 1),
                        "loadavg_start": load0,
                        "loadavg_end": os.getloadavg(),
                    }
                    if bench_id == "C1" and isinstance(data, tuple):
                        c1, c3 = data
                        self.record(key, {**c1, **extra})
                        self.record(f"C3@{label}", {**c3, **extra})
                    else:
                        self.record(key, {**data, **extra})
        except (KeyboardInterrupt, Exception) as exc:
            failures += 1
            self.stopped_early(exc, "cp_bench")
        finally:
            self.cleanup()
        return self.finish(failures, print_summary, print_cp_summary)


def print_cp_summary(results: dict[str, Any]) -> None:
    """The figures the issue asks for, side by side for both datagram sizes."""
    print("\nfly-vault cp vs scp / tar|ssh  (median of rounds; ratios are ours over theirs)")
    rows = [("datagram", "figure", "fly-vault", "baseline", "ratio", "target")]
    for label, _ in HALVES:
        c1 = results["benchmarks"].get(f"C1@{label}") or {}
        m = c1.get("metrics") or {}
        for d in ("up", "down"):
            ours = (m.get(f"fly_vault_{d}_MBps") or {}).get("p50")
            theirs = (m.get(f"scp_{d}_MBps") or {}).get("p50")
            r = (c1.get("ratios") or {}).get(f"{d}_fly_vault_over_scp_rate")
            met = "-" if r is None else ("MET" if r >= 0.5 else "MISSED")
            rows.append(
                (label, f"file {d} MB/s vs scp", fmt(ours), fmt(theirs), fmt(r), f">=0.5 {met}")
            )
        c2 = results["benchmarks"].get(f"C2@{label}") or {}
        m = c2.get("metrics") or {}
        for d in ("up", "down"):
            ours = (m.get(f"fly_vault_{d}_s") or {}).get("p50")
            tar = (m.get(f"tar_ssh_{d}_s") or {}).get("p50")
            scp = (m.get(f"scp_{d}_s") or {}).get("p50")
            r = (c2.get("ratios") or {}).get(f"{d}_fly_vault_over_tar_ssh_time")
            met = "-" if r is None else ("MET" if r <= 1.0 else "MISSED")
            rows.append(
                (label, f"tree {d} s vs tar|ssh", fmt(ours), fmt(tar), fmt(r), f"<=1.0 {met}")
            )
            rs = (c2.get("ratios") or {}).get(f"{d}_fly_vault_over_scp_r_time")
            rows.append((label, f"tree {d} s vs scp -r", fmt(ours), fmt(scp), fmt(rs), ""))
        c3 = results["benchmarks"].get(f"C3@{label}") or {}
        for d, data in ((c3.get("metrics") or {}).get("rss") or {}).items():
            peaks = [(k, v) for k, v in data.items() if k.startswith("peak_kb_")]
            for who in ("client", "init", "worker_max"):
                values = " -> ".join(f"{v.get(who, 0) / 1024:.1f}" for _, v in peaks)
                growth = (data.get("growth_kb") or {}).get(who)
                met = (
                    "-" if growth is None else ("MET" if growth <= RSS_FLAT_LIMIT_KB else "MISSED")
                )
                sizes = " -> ".join(k.removeprefix("peak_kb_") for k, _ in peaks)
                rows.append(
                    (
                        label,
                        f"RSS {who} {d} MiB ({sizes})",
                        values,
                        "",
                        f"{(growth or 0) / 1024:+.1f}",
                        f"<=+16 {met}",
                    )
                )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    machine = results.get("machine", {})
    print(
        f"load {fmt_load(machine.get('loadavg_start'))} -> {fmt_load(machine.get('loadavg_end'))}; note: {results.get('note')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 MB file, 2,000 files, 2 rounds")
    parser.add_argument(
        "--size-mb", type=int, help="the large file in MB (default 1000; --quick 200)"
    )
    parser.add_argument("--files", type=int, help="files in the tree (default 10000; --quick 2000)")
    parser.add_argument("--tree-mb", type=int, help="the tree's total size (default 10 kB a file)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 2)")
    parser.add_argument(
        "--budget",
        type=float,
        default=900.0,
        help="seconds per benchmark and half after which no new round starts (default 900)",
    )
    parser.add_argument("--only", default="C1,C2", help="C1 (file, with C3 RSS) and/or C2 (tree)")
    parser.add_argument("--datagram", default="default,1200", help="which halves: default,1200")
    parser.add_argument("--pin", action="store_true", help="pin clients to CPU 0, servers to CPU 1")
    parser.add_argument("--out", help="results file (default bench/results/cp-<date>-<sha>.json)")
    parser.add_argument("--note", help="free text stored in the results (e.g. 'machine busy')")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    if not only or any(x not in ("C1", "C2", "C3") for x in only):
        parser.error("--only takes C1, C2 (C3 comes with C1)")
    wanted = [x.strip() for x in args.datagram.split(",") if x.strip()]
    halves = [h for h in HALVES if h[0] in wanted]
    if not halves or len(halves) != len(wanted):
        parser.error("--datagram takes default and/or 1200")
    if os.geteuid() != 0:
        parser.error("run as root: it creates a user and runs its own sshd")
    if not os.path.exists(FLY_VAULT):
        parser.error(f"{FLY_VAULT} not found (create the venv first)")
    if args.pin and (os.cpu_count() or 1) < 2:
        parser.error("--pin needs 2 CPUs")
    for value, name in (
        (args.size_mb, "--size-mb"),
        (args.files, "--files"),
        (args.rounds, "--rounds"),
    ):
        if value is not None and value < 1:
            parser.error(f"{name} must be at least 1")

    def terminate(signo: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signo}")

    signal.signal(signal.SIGTERM, terminate)
    bench = CpBench(args)
    bench.setup_environment()
    return bench.run_cp(only, halves)


if __name__ == "__main__":
    raise SystemExit(main())
