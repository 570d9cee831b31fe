"""Memory stays flat while a large file goes through the file stream (issue 14, speed and
memory): a 256 MiB file (sparse on the source side, to spare the disk) is written with
``RemoteFiles.write`` and read back with ``RemoteFiles.read`` against a real host-mode init
over real QUIC, sampling the resident size of the client (this process), of init and of its
file worker from /proc at every chunk. Each must grow by far less than the file."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from conftest import InitProcess, run_async, vault_entry

from flyvault.standins import OidcIssuer

SIZE = 256 * 1024 * 1024
CHUNK = 1024 * 1024
LIMIT = 64 * 1024 * 1024


def rss(pid: int | str) -> int:
    """VmRSS in bytes (0 once the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    def __init__(self, init_pid: int) -> None:
        self.init_pid = init_pid
        self.own = Path(f"/proc/{init_pid}/cmdline").read_bytes()
        self.base = {"client": rss("self"), "init": rss(init_pid)}
        self.peak = dict(self.base)
        self.worker_peak = 0
        self.workers: set[int] = set()

    def sample(self) -> None:
        self.peak["client"] = max(self.peak["client"], rss("self"))
        self.peak["init"] = max(self.peak["init"], rss(self.init_pid))
        for task in Path(f"/proc/{self.init_pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    if Path(f"/proc/{child}/cmdline").read_bytes() == self.own:
                        self.workers.add(int(child))
                        self.worker_peak = max(self.worker_peak, rss(child))

    def growth(self) -> dict[str, int]:
        return {name: self.peak[name] - self.base[name] for name in self.base}


def test_client_init_and_worker_memory_stay_flat_for_a_256_mib_file(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    source = tmp_path / "big.src"
    with open(source, "wb") as file:  # sparse, with data at a few places
        file.truncate(SIZE)
        for offset in (0, SIZE // 3, SIZE - 4096):
            file.seek(offset)
            file.write(os.urandom(4096))
    target = tmp_path / "big.dst"
    sampler = Sampler(init_process.process.pid)

    async def body(vault: Any) -> tuple[Any, str, int]:
        files = vault.files()

        async def chunks() -> AsyncIterator[bytes]:
            with open(source, "rb") as file:
                while chunk := file.read(CHUNK):
                    sampler.sample()
                    yield chunk

        written = await files.write(str(target), chunks(), size=SIZE)
        digest = hashlib.sha256()
        size = 0
        async for chunk in files.read(str(target)):
            sampler.sample()
            digest.update(chunk)
            size += len(chunk)
        return written, digest.hexdigest(), size

    try:
        written, read_digest, read_size = run_async(_with_vault(init_process, issuer, body), 240)
        expected = hashlib.sha256()
        with open(source, "rb") as file:
            while chunk := file.read(CHUNK):
                expected.update(chunk)
        assert written.size == read_size == SIZE
        assert written.sha256 == read_digest == expected.hexdigest()
        growth = sampler.growth()
        print(f"growth {growth}, worker peak {sampler.worker_peak}")  # for the report (-s)
        assert sampler.workers, "no file worker was seen"
        assert growth["client"] < LIMIT, growth
        assert growth["init"] < LIMIT, growth
        assert sampler.worker_peak < LIMIT + sampler.base["init"], sampler.worker_peak
    finally:
        target.unlink(missing_ok=True)
        source.unlink(missing_ok=True)


async def _with_vault(init_process: InitProcess, issuer: OidcIssuer, body: Any) -> Any:
    from flyvault.client import Vault

    vault = Vault(vault_entry(init_process.port, issuer))
    try:
        return await body(vault)
    finally:
        await vault.close()
