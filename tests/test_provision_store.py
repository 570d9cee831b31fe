"""The on-volume rootfs store: activation, rollback, persistence, recovery, crash safety."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rootfs_fixtures import (
    basic_rootfs,
    directory,
    hardlink,
    manifest,
    regular,
    symlink,
    tar_bytes,
    write_archive,
)

from flyvault.errors import ProvisionError
from flyvault.server.provision.extract import ExtractLimits, StreamingExtractor
from flyvault.server.provision.store import ActivationResult, RootfsStore

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (mount, owners)")
REPO = Path(__file__).resolve().parent.parent
DRIVER = Path(__file__).resolve().parent / "rootfs_fixtures.py"
MiB = 1024 * 1024


def extract_into(staging: Path, data: bytes, **kw: Any) -> None:
    async def run() -> None:
        extractor = StreamingExtractor(staging, **kw)
        for offset in range(0, len(data), 64 * 1024):
            await extractor.feed(data[offset : offset + 64 * 1024])
        await extractor.finish(len(data))

    asyncio.run(run())


def provision(
    store: RootfsStore, data: bytes, start: Callable[[Path], bool] = lambda root: True, **kw: Any
) -> ActivationResult:
    staging = store.new_staging()
    extract_into(staging, data, **kw)
    store.prepare_persistence(staging)
    return store.activate(start)


def add_user_work(store: RootfsStore) -> None:
    """What a user did in the vault: must survive everything byte for byte."""
    (store.persist_root / ".profile").write_text("# edited by the user\n")
    (store.persist_root / "project").mkdir()
    (store.persist_root / "project/main.py").write_bytes(os.urandom(100_000))
    (store.persist_home / "user/work.txt").write_text("unsaved thoughts\n")
    if ROOT:
        os.chown(store.persist_home / "user/work.txt", 1000, 1000)


def state(store: RootfsStore) -> tuple[Any, ...]:
    return (
        store.provisioned,
        manifest(store.rootfs) if store.rootfs.exists() else None,
        manifest(store.persist) if store.persist.exists() else None,
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("images")
    return {
        variant: write_archive(
            base / f"{variant}.tar.gz", basic_rootfs(variant, blob_size=256 * 1024)
        ).read_bytes()
        for variant in ("a", "b")
    }


@pytest.fixture
def ready(tmp_path: Path, images: dict[str, bytes]) -> RootfsStore:
    """A vault provisioned with image A, with user work in /root and /home."""
    store = RootfsStore(tmp_path / "data")
    provision(store, images["a"])
    add_user_work(store)
    return store


# -- activation -------------------------------------------------------------------------------


def test_first_provision_seeds_persistence(tmp_path: Path, images: dict[str, bytes]) -> None:
    store = RootfsStore(tmp_path / "data")
    assert not store.provisioned
    started: list[Path] = []

    def start(root: Path) -> bool:
        started.append(root)
        return True

    result = provision(store, images["a"], start)
    assert started == [store.rootfs]
    assert store.provisioned and store.marker.read_bytes() == b"1"
    assert not result.had_previous and result.seeded == ["root", "home"]
    assert set(result.timings) == {"sync", "swap", "marker", "start", "cleanup"}
    assert (store.rootfs / "etc/os-release").read_text() == "NAME=fly-vault-test-a\n"
    # The image's /root and /home moved to persist/; the rootfs keeps empty mountpoints.
    assert (store.persist_root / ".profile").read_text() == "# root profile a\n"
    assert (store.persist_home / "user/notes.txt").exists()
    assert os.listdir(store.rootfs / "root") == os.listdir(store.rootfs / "home") == []
    assert (store.rootfs / "root").stat().st_mode & 0o777 == 0o700
    assert sorted(os.listdir(store.data_dir)) == [".provisioned", "persist", "rootfs"]


def test_reprovision_replaces_rootfs_and_keeps_homes(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    persisted = manifest(ready.persist)
    result = provision(ready, images["b"])
    assert result.had_previous and result.seeded == []
    assert (ready.rootfs / "etc/os-release").read_text() == "NAME=fly-vault-test-b\n"
    assert manifest(ready.persist) == persisted
    assert (ready.persist_root / ".profile").read_text() == "# edited by the user\n"
    # The previous rootfs is set aside at once and deleted after the answer.
    assert sorted(os.listdir(ready.data_dir)) == [
        ".provisioned",
        "persist",
        "rootfs",
        "rootfs.discard",
    ]
    assert (ready.discard_dir / "etc/os-release").read_text() == "NAME=fly-vault-test-a\n"
    ready.purge_discarded()
    assert sorted(os.listdir(ready.data_dir)) == [".provisioned", "persist", "rootfs"]
    # Recovery deletes one that a crash left behind.
    (ready.discard_dir / "etc").mkdir(parents=True)
    assert ready.recover() == []
    assert not ready.discard_dir.exists()


def test_empty_persistent_home_is_seeded_on_reprovision(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    shutil.rmtree(ready.persist_home)
    ready.persist_home.mkdir()
    root_before = manifest(ready.persist_root)
    result = provision(ready, images["b"])
    assert result.seeded == ["home"]
    assert (ready.persist_home / "user/notes.txt").read_text() == "user notes b\n"
    assert manifest(ready.persist_root) == root_before


def test_failed_start_rolls_back_and_restarts_the_old_runtime(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    before = state(ready)
    calls: list[str] = []

    def start(root: Path) -> bool:
        calls.append((root / "etc/os-release").read_text())
        return "-a" in calls[-1]  # only the old image starts

    with pytest.raises(ProvisionError, match=r"did not start.*previous rootfs was restored"):
        provision(ready, images["b"], start)
    assert calls == ["NAME=fly-vault-test-b\n", "NAME=fly-vault-test-a\n"]
    assert state(ready) == before
    assert sorted(os.listdir(ready.data_dir)) == [".provisioned", "persist", "rootfs"]


def test_failed_first_start_leaves_the_vault_cold(tmp_path: Path, images: dict[str, bytes]) -> None:
    store = RootfsStore(tmp_path / "data")

    def start(root: Path) -> bool:
        raise RuntimeError("clone failed")

    with pytest.raises(ProvisionError, match=r"clone failed.*stays cold"):
        provision(store, images["a"], start)
    assert not store.provisioned and not store.rootfs.exists()
    assert os.listdir(store.persist_root) == os.listdir(store.persist_home) == []


def test_reprovision_without_device_privilege_skips_and_reports(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    persisted = manifest(ready.persist)
    staging = ready.new_staging()

    async def run() -> list[str]:
        # Allowed by the provisioning, but this process may not make them.
        extractor = StreamingExtractor(staging, can_make_devices=False, allow_devices=True)
        await extractor.feed(tar_bytes(basic_rootfs("b", devices=True)))
        return (await extractor.finish()).skipped_devices

    assert asyncio.run(run()) == ["dev/null", "dev/loop0"]
    ready.prepare_persistence(staging)
    ready.activate(lambda root: True)
    assert not (ready.rootfs / "dev/null").exists()
    assert manifest(ready.persist) == persisted


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_non_directory_home_is_refused(ready: RootfsStore, kind: str) -> None:
    before = state(ready)
    home = symlink("home", "/var/home") if kind == "symlink" else regular("home", b"x")
    members = [m for m in basic_rootfs("b") if not m.name.startswith("home")] + [home]
    staging = ready.new_staging()
    extract_into(staging, tar_bytes(members))
    with pytest.raises(ProvisionError, match=r"image's /home is .*must be a directory"):
        ready.prepare_persistence(staging)
    ready.discard_staging()
    assert state(ready) == before


def test_new_staging_does_not_follow_a_symlink(ready: RootfsStore, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("keep")
    ready.staging.symlink_to(precious)
    staging = ready.new_staging()
    assert staging.is_dir() and not staging.is_symlink() and os.listdir(staging) == []
    assert (precious / "file").read_text() == "keep"


# -- recovery of leftovers --------------------------------------------------------------------


def test_recover_cleans_leftovers(ready: RootfsStore) -> None:
    before = state(ready)
    assert ready.recover() == []
    shutil.copytree(ready.rootfs / "etc", ready.staging, symlinks=True)
    shutil.copytree(ready.rootfs / "etc", ready.previous, symlinks=True)
    ready.journal.with_name(".activation.tmp").write_text("{")
    notes = ready.recover()
    assert any("staging" in note for note in notes) and any("previous" in note for note in notes)
    assert state(ready) == before
    assert sorted(os.listdir(ready.data_dir)) == [".provisioned", "persist", "rootfs"]


def test_recover_marker_without_rootfs_is_cold(tmp_path: Path) -> None:
    store = RootfsStore(tmp_path / "data")
    store.data_dir.mkdir()
    store.marker.write_text("1")
    assert any("cold" in note for note in store.recover())
    assert not store.provisioned


def test_recover_restores_the_original_crash_window(ready: RootfsStore) -> None:
    """The original's unrecoverable state: marker, rootfs.previous, no rootfs."""
    before = state(ready)
    os.rename(ready.rootfs, ready.previous)
    assert any("restored" in note for note in ready.recover())
    assert state(ready) == before


def test_recover_with_a_corrupt_journal_keeps_the_rootfs(ready: RootfsStore) -> None:
    before = state(ready)
    ready.journal.write_text("{not json")
    assert any("unreadable" in note for note in ready.recover())
    assert state(ready) == before


# -- bad input leaves everything untouched ----------------------------------------------------


def _bad_archives() -> dict[str, tuple[bytes, dict[str, Any], str]]:
    good = tar_bytes(basic_rootfs("b", blob_size=100_000))
    bomb = gzip.compress(tar_bytes([regular("zeros", b"\0" * (64 * MiB))]))
    return {
        "traversal": (tar_bytes([regular("../../persist/root/.profile", b"x")]), {}, "'..'"),
        "absolute": (tar_bytes([regular("/data/persist/root/.profile", b"x")]), {}, "absolute"),
        "symlink-escape": (
            tar_bytes([symlink("p", "../persist"), regular("p/root/.profile", b"x")]),
            {},
            "symlink",
        ),
        "hardlink-escape": (tar_bytes([hardlink("h", "../rootfs/etc/os-release")]), {}, "'..'"),
        "bomb": (bomb, {"limits": ExtractLimits(max_total_bytes=8 * MiB)}, "bomb"),
        "truncated": (gzip.compress(good)[:50_000], {}, "truncated"),
        "not-an-archive": (b"<html>404 Not Found</html>\n" * 40, {}, "not a tar"),
        "empty": (b"", {}, "empty"),
        "too-many-entries": (good, {"limits": ExtractLimits(max_entries=5)}, "entries"),
    }


@pytest.mark.parametrize("case", list(_bad_archives()))
def test_bad_archive_leaves_the_vault_untouched(ready: RootfsStore, case: str) -> None:
    data, kwargs, words = _bad_archives()[case]
    before = state(ready)
    staging = ready.new_staging()
    with pytest.raises(ProvisionError, match=words):
        extract_into(staging, data, **kwargs)
    ready.discard_staging()
    assert state(ready) == before
    ready.new_staging()  # and as if init crashed right there and restarted
    ready.recover()
    assert state(ready) == before
    assert sorted(os.listdir(ready.data_dir)) == [".provisioned", "persist", "rootfs"]


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("reserve", [0, 4 * MiB])
def test_full_disk(small_volume: Path, reserve: int) -> None:
    store = RootfsStore(small_volume / "data")
    provision(store, tar_bytes(basic_rootfs("a")), min_free_bytes=0)
    add_user_work(store)
    before = state(store)
    size = 12 * MiB if reserve == 0 else 5 * MiB  # past the disk, or only past the reserve
    big = gzip.compress(tar_bytes([directory("usr"), regular("usr/big", os.urandom(size))]), 1)
    staging = store.new_staging()
    with pytest.raises(
        ProvisionError,
        match=r"the volume is full: \d+ MiB free on \S+ with \d+ bytes of the new rootfs "
        rf"unpacked so far; entry 'usr/big' needs {size // MiB}\.0 MiB more and "
        rf"{reserve // MiB} MiB are kept in reserve",
    ):
        extract_into(staging, big, min_free_bytes=reserve)
    store.discard_staging()
    assert state(store) == before


# -- killed at any point ---------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    template: Path | None  # a data dir to start from (copied with cp -a), None: cold
    start: str  # "ok" or "fail": what the new runtime does
    allowed: list[tuple[Any, ...]]  # acceptable (provisioned, rootfs, persist) afterwards


def driver_argv(
    data: Path, kill_at: int, archive: Path | None = None, start: str = "ok"
) -> list[str]:
    """The crash driver: provision ``archive`` into ``data`` (or only recover ``data``)."""
    if archive is None:
        return [sys.executable, str(DRIVER), "recover", str(data), str(kill_at)]
    return [sys.executable, str(DRIVER), "provision", str(data), str(archive), str(kill_at), start]


def run_driver(
    data: Path, *, kill_at: int = 0, archive: Path | None = None, start: str = "ok"
) -> subprocess.CompletedProcess[str]:
    argv = driver_argv(data, kill_at, archive, start)
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def checkpoints(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["checkpoints"])


def copy_tree(source: Path, target: Path) -> None:
    """cp -a: keeps owners, modes, xattrs, links and devices (copytree would not)."""
    shutil.rmtree(target, ignore_errors=True)
    if source.exists():
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)


@pytest.fixture(scope="module")
def crash_setup(
    tmp_path_factory: pytest.TempPathFactory, images: dict[str, bytes]
) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("crash")
    archive_b = base / "b.tar.gz"
    archive_b.write_bytes(images["b"])
    template = base / "template"
    store = RootfsStore(template)
    provision(store, images["a"])
    add_user_work(store)
    with_a = state(store)
    fresh_b = RootfsStore(base / "fresh-b")
    provision(fresh_b, images["b"])
    reprovisioned = base / "reprovisioned"
    subprocess.run(["cp", "-a", str(template), str(reprovisioned)], check=True)
    provision(RootfsStore(reprovisioned), images["b"])
    with_b = state(RootfsStore(reprovisioned))
    assert with_b[2] == with_a[2]
    scenarios = [
        Scenario("cold", None, "ok", [(False, None, None), state(fresh_b)]),
        Scenario("reprovision", template, "ok", [with_a, with_b]),
        Scenario("reprovision-start-fails", template, "fail", [with_a]),
    ]
    return {"base": base, "archive": archive_b, "scenarios": {s.name: s for s in scenarios}}


def fresh_data(scenario: Scenario, where: Path) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    if scenario.template is not None:
        copy_tree(scenario.template, where)
    return where


def check_recovered(data: Path, scenario: Scenario, context: str) -> None:
    store = RootfsStore(data)
    store.recover()
    if not data.exists():  # killed before the data dir was made: cold, nothing to check
        assert scenario.template is None, context
        return
    leftovers = set(os.listdir(data)) - {"rootfs", "persist", ".provisioned"}
    assert not leftovers, f"{context}: leftovers {leftovers}"
    got = state(store)
    if not got[0] and scenario.template is None:
        # Cold: no rootfs, and persistence never seeded (or seeded and undone: empty).
        assert got[1] is None, context
        assert got[2] is None or all(not os.listdir(store.persist / n) for n in ("root", "home")), (
            context
        )
        return
    assert got in scenario.allowed, f"{context}: not a complete old or new state"


@pytest.mark.parametrize("name", ["cold", "reprovision", "reprovision-start-fails"])
def test_sigkill_at_every_step(crash_setup: dict[str, Any], name: str) -> None:
    """Kill at every checkpoint: each fed chunk (extraction), persistence preparation,
    every activation step, the marker, the commit and the rollback."""
    scenario: Scenario = crash_setup["scenarios"][name]
    base: Path = crash_setup["base"]
    archive: Path = crash_setup["archive"]
    data = fresh_data(scenario, base / f"{name}-reference")
    total = checkpoints(run_driver(data, archive=archive, start=scenario.start))
    check_recovered(data, scenario, f"{name} uninterrupted")
    assert total >= 25
    for kill_at in range(1, total + 1):
        data = fresh_data(scenario, base / f"{name}-{kill_at}")
        result = run_driver(data, kill_at=kill_at, archive=archive, start=scenario.start)
        assert result.returncode == -9, f"step {kill_at}: {result.returncode} {result.stderr}"
        check_recovered(data, scenario, f"{name} killed at checkpoint {kill_at}/{total}")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize("name", ["cold", "reprovision"])
def test_sigkill_after_timed_delays(crash_setup: dict[str, Any], name: str) -> None:
    """The same, killed from outside after 0..T ms, so kills also land between checkpoints."""
    scenario: Scenario = crash_setup["scenarios"][name]
    base: Path = crash_setup["base"]
    archive: Path = crash_setup["archive"]
    data = fresh_data(scenario, base / f"{name}-timed")
    started = time.monotonic()
    checkpoints(run_driver(data, archive=archive))
    duration = time.monotonic() - started
    points = 15
    for index in range(points):
        delay = duration * index / points
        data = fresh_data(scenario, base / f"{name}-timed-{index}")
        process = subprocess.Popen(
            driver_argv(data, 0, archive),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.kill()  # SIGKILL to the one process this test started
        process.wait(timeout=30)
        check_recovered(data, scenario, f"{name} killed after {delay:.3f}s")
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.parametrize("name", ["cold", "reprovision", "reprovision-start-fails"])
def test_sigkill_during_recovery(crash_setup: dict[str, Any], name: str) -> None:
    """Interrupt a provision at each store step, then kill its recovery at each of the
    recovery's steps: the next recovery still ends in a complete state."""
    scenario: Scenario = crash_setup["scenarios"][name]
    base: Path = crash_setup["base"]
    archive: Path = crash_setup["archive"]
    data = fresh_data(scenario, base / f"{name}-probe")
    total = checkpoints(run_driver(data, archive=archive, start=scenario.start))
    interrupted = base / f"{name}-interrupted"
    probe = base / f"{name}-recover-probe"
    recovering = base / f"{name}-recovering"
    tried = 0
    # The store's steps come last, after the fed chunks.
    for kill_at in range(total - 14, total + 1):
        fresh_data(scenario, interrupted)
        run_driver(interrupted, kill_at=kill_at, archive=archive, start=scenario.start)
        copy_tree(interrupted, probe)
        steps = checkpoints(run_driver(probe)) if probe.exists() else 0
        for recover_kill in range(1, steps + 1):
            copy_tree(interrupted, recovering)
            result = run_driver(recovering, kill_at=recover_kill)
            assert result.returncode == -9, result.stderr
            check_recovered(
                recovering,
                scenario,
                f"{name}: killed at {kill_at}, recovery killed at {recover_kill}",
            )
            tried += 1
    assert tried > 0


def test_death_inside_the_settle_window_rolls_back_after_the_answer(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    """The client is answered once the new workload is up (``started``); if it then dies
    inside the window (``settled`` says why), the previous rootfs still comes back."""
    before = state(ready)
    events: list[str] = []

    def start(root: Path) -> bool:
        events.append("start " + (root / "etc/os-release").read_text().strip())
        return True

    def started() -> None:
        events.append("answered")

    def settled() -> str | None:
        events.append("watched")
        return "its init exited 0.4 s after its start"

    staging = ready.new_staging()
    extract_into(staging, images["b"])
    ready.prepare_persistence(staging)
    with pytest.raises(ProvisionError, match=r"exited 0.4 s after.*previous rootfs was restored"):
        ready.activate(start, started=started, settled=settled)
    assert events == [
        "start NAME=fly-vault-test-b",
        "answered",
        "watched",
        "start NAME=fly-vault-test-a",
    ]
    assert state(ready) == before
    assert sorted(os.listdir(ready.data_dir)) == [".provisioned", "persist", "rootfs"]


def test_a_workload_that_stays_up_through_the_window_is_committed(
    ready: RootfsStore, images: dict[str, bytes]
) -> None:
    staging = ready.new_staging()
    extract_into(staging, images["b"])
    ready.prepare_persistence(staging)
    events: list[str] = []
    result = ready.activate(
        lambda root: True,
        started=lambda: events.append("answered"),
        settled=lambda: events.append("watched") and None,
    )
    assert events == ["answered", "watched"]
    assert "settle" in result.timings
    assert (ready.rootfs / "etc/os-release").read_text() == "NAME=fly-vault-test-b\n"
    assert not ready.journal.exists()
