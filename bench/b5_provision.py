"""B5: reprovision of a generated ~200 MB rootfs tar.gz end to end, against ``tar xzf``.

As root. One temp dir on the same disk for everything. Steps, interleaved per round:
``tar xzf`` of the archive into a fresh dir (with ``sync``), then ``fly-vault reprovision``
of the same archive to a local vm-mode vault (upload, streamed extraction, activation,
the new workload up: the client's answer; then the CLI waits out the rest of the settle
window to report a rollback, since 88a1068, and that is in its wall time). Reported against the tar
time of the same round: end to end (the CLI's wall time, plus ``sync``) and init's
receive+extract phase. Also records the init server's peak RSS across sizes, to show it
does not grow with the image.

Fairness: on ext4 creating inodes right after many were deleted is slower (the allocator
skips recently deleted inodes), so each timed step follows the deletion of one tree of
the same size (the previous tar output, or the vault's previous rootfs, whose background
deletion is waited for), and nothing of ours runs during ``tar``.

    .venv/bin/python bench/b5_provision.py [--mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _server_phases(log_file: Path) -> dict[str, float]:
    """The phases of the last provisioning, from init's log line
    ``provisioned for ADDR in T s (name S s, ...)``."""
    lines = [line for line in log_file.read_text().splitlines() if "provisioned for" in line]
    if not lines or "(" not in lines[-1]:
        return {}
    inside = lines[-1].rsplit("(", 1)[1].rstrip(")")
    phases = {}
    for part in inside.split(", "):
        name, seconds, _unit = part.split(" ")
        phases[name] = float(seconds)
    return phases


def _provisioned_lines(log_file: Path) -> int:
    return sum("provisioned for" in line for line in log_file.read_text().splitlines())


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"b5: timed out waiting for {what}")
        time.sleep(0.05)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200, help="size of the tar.gz (MB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("b5: needs root (the vault runs the rootfs in namespaces)", file=sys.stderr)
        return 2
    from rootfs_fixtures import generated_tree_archive

    work = Path(tempfile.mkdtemp(prefix="fvb5-", dir=str(ROOT / "bench")))
    env = dict(os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        env[var] = str(work / var.lower())
    fly_vault = [sys.executable, "-m", "flyvault.cli.main"]
    results: dict[str, object] = {"mb": args.mb, "loadavg_start": os.getloadavg()}
    try:
        archive = generated_tree_archive(work / "image.tar.gz", args.mb * 1_000_000)
        size = archive.stat().st_size
        # A small valid rootfs for the first provision, so every timed run is a reprovision.
        seed = work / "seed"
        (seed / "bin").mkdir(parents=True)
        shutil.copy2("/bin/busybox", seed / "bin/busybox")
        (seed / "bin/sh").symlink_to("busybox")
        small = work / "seed.tar.gz"
        subprocess.run(["tar", "-C", str(seed), "-czf", str(small), "."], check=True)
        subprocess.run(
            [*fly_vault, "local", "up", "--rootfs", str(small)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        state = json.loads((work / "xdg_data_home/fly-vault/local/state.json").read_text())
        subprocess.run(
            [*fly_vault, "exec", "local", "--", "sh", "-c", ":"],
            env=env,
            check=True,
            stderr=subprocess.DEVNULL,
        )
        rss_small = _peak_rss_kb(state["pid"])
        config = work / "xdg_config_home/fly-vault/config.toml"
        config.write_text(config.read_text().replace(str(small), str(archive)))
        log_file = Path(state["log_file"])
        data_dir = Path(state.get("data_dir") or log_file.parent / "data")
        tar_times: list[float] = []
        ours: list[float] = []
        phases: list[dict[str, float]] = []
        target = work / "tar-out"
        for _ in range(args.rounds):
            # The vault's previous rootfs is deleted in the background after a reprovision:
            # let that finish (tar then follows one deleted tree, like ours below).
            _wait_until(lambda: not (data_dir / "rootfs.discard").exists(), "the purge")
            target.mkdir()
            subprocess.run(["sync"], check=True)
            started = time.perf_counter()
            subprocess.run(["tar", "-C", str(target), "-xzf", str(archive)], check=True)
            subprocess.run(["sync"], check=True)
            tar_times.append(time.perf_counter() - started)
            shutil.rmtree(target)
            subprocess.run(["sync"], check=True)
            before = _provisioned_lines(log_file)
            started = time.perf_counter()
            subprocess.run(
                [*fly_vault, "reprovision", "local", "--yes"],
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            subprocess.run(["sync"], check=True)
            ours.append(time.perf_counter() - started)
            # The settle window ends after the client's answer: init logs the phases then.
            _wait_until(lambda n=before: _provisioned_lines(log_file) > n, "the settle window")
            phases.append(_server_phases(log_file))
        receive = [p.get("receive_extract", 0.0) for p in phases]
        per_round = [
            {
                "tar_xzf_s": t,
                "end_to_end_s": e,
                "receive_extract_s": r,
                "end_to_end_vs_tar": e / t,
                "receive_extract_vs_tar": r / t,
            }
            for t, e, r in zip(tar_times, ours, receive, strict=True)
        ]
        results.update(
            archive_bytes=size,
            tar_xzf_s=tar_times,
            reprovision_s=ours,
            server_phases_s=phases,
            rounds=per_round,
            # Each round against its own tar run (same disk state), then the medians.
            end_to_end_vs_tar_median=_median([r["end_to_end_vs_tar"] for r in per_round]),
            receive_extract_vs_tar_median=_median([r["receive_extract_vs_tar"] for r in per_round]),
            ratio_best=min(ours) / min(tar_times),
            receive_extract_ratio_best=min(receive) / min(tar_times),
            reprovision_MB_s=size / min(ours) / 1e6,
            init_peak_rss_kb_after_small=rss_small,
            init_peak_rss_kb_after_large=_peak_rss_kb(state["pid"]),
            loadavg_end=os.getloadavg(),
        )
    finally:
        subprocess.run([*fly_vault, "local", "down"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    results["commit"] = commit
    stamp = time.strftime("%Y-%m-%dT%H%M%S", time.gmtime())
    out = ROOT / "bench/results" / f"b5-{stamp}-{commit or 'unknown'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
