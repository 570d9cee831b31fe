"""Container images streamed into a vault (``fly-vault cp-image``, a plan's ``image`` step).

``podman save`` (or ``docker save``) here is piped into ``podman load`` on the vault over
one exec session's stdin: no intermediate file on either side. ``podman load`` can exit 0
on a truncated stream and register an image with torn layers, so the vault also hashes what
it received (a FIFO beside the load) and the client compares that SHA-256 and size with
what it sent. Only a load that matches is marked verified on the vault (a marker file per
image id); an image that is there without the marker is treated as torn: every ref to it
is removed and it is streamed again, once. An image already there, with the same id and
the marker, is skipped.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flyvault.errors import IntegrityError, NotFoundError, UsageError, VaultError

CHUNK = 256 * 1024
ENGINES = ("podman", "docker")
#: Where the vault keeps the verified markers: root's storage, or a rootless user's.
ROOT_MARKERS = "/var/lib/fly-vault/images"
USER_MARKERS = "$HOME/.local/share/fly-vault/images"
REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}")
ID_RE = re.compile(r"[0-9a-f]{64}")
_LOAD = """set -e
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
mkfifo "$d/f"
( sha256sum < "$d/f" > "$d/sum"; ) &
hasher=$!
tee "$d/f" | podman load
wait "$hasher"
echo "fly-vault-digest $(cut -d' ' -f1 "$d/sum")"
"""


@dataclass(frozen=True)
class ImageCopy:
    image: str
    tag: str
    image_id: str
    #: "copied", "skipped" (there and verified) or "recopied" (a torn one replaced).
    action: str
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_ref(ref: str, what: str = "image") -> str:
    if not REF_RE.fullmatch(ref):
        raise UsageError(f"{ref!r} is not an {what} reference (e.g. localhost/app:1)")
    return ref


def local_engine(wanted: str | None = None) -> str:
    for name in (wanted,) if wanted else ENGINES:
        if name and shutil.which(name):
            return name
    missing = wanted or "podman or docker"
    raise UsageError(
        f"cp-image needs {missing} on this machine: it is not on PATH",
        hint="install podman, or pass --engine docker",
    )


def local_image_id(engine: str, image: str) -> str:
    """The image's id here (``sha256:`` stripped); a usage error when there is none."""
    found = subprocess.run(
        [engine, "image", "inspect", "--format", "{{.Id}}", image],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        raise UsageError(
            f"no image {image!r} in this machine's {engine} storage",
            hint=f"'{engine} images' lists them; build or pull it first",
        )
    return found.stdout.strip().removeprefix("sha256:")


async def copy_image(
    vault: Any,
    image: str,
    *,
    tag: str | None = None,
    user: str | None = None,
    engine: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> ImageCopy:
    """Stream ``image`` into the vault's podman (root's, or ``user``'s rootless storage)."""
    import time

    began = time.monotonic()
    engine = local_engine(engine)
    image_id = await asyncio.to_thread(local_image_id, engine, image)
    tag = tag or image
    if not ID_RE.fullmatch(image_id):
        raise VaultError(f"{engine} reported {image_id!r} as the id of {image}: not a sha256 id")
    remote = _Remote(vault, user)
    await remote.require_podman()
    action = "copied"
    if await remote.present(image_id):
        if await remote.marked(image_id):  # there and verified (under any name): tag it
            await remote.finish(image_id, tag)
            return ImageCopy(image, tag, image_id, "skipped", 0, round(time.monotonic() - began, 2))
        await remote.remove(image_id)  # there, but never verified: torn
        action = "recopied"
    sent = 0
    for attempt in range(2):
        sent, digest = await remote.load(engine, image, on_bytes)
        if digest is not None and await remote.image_id(image_id) == image_id:
            break
        await remote.remove(image_id)
        if attempt == 1:
            raise IntegrityError(
                f"{image}: the vault received a stream that does not match what was sent, "
                "twice; the image was removed there",
                hint="check the vault's disk space (fly-vault exec VAULT -- df -h), then copy again",
            )
        action = "recopied"
    await remote.finish(image_id, tag)
    return ImageCopy(image, tag, image_id, action, sent, round(time.monotonic() - began, 2))


async def remove_image(vault: Any, tag: str, image_id: str, *, user: str | None = None) -> None:
    """Untag ``tag`` on the vault (the image goes with its last name) and forget that it was
    verified; an image already gone is done."""
    remote = _Remote(vault, user)
    await remote.must(
        f"podman image exists {shlex.quote(tag)} || exit 0\n"
        f"podman rmi {shlex.quote(tag)} >/dev/null\n"
        f'podman image exists {shlex.quote(image_id)} || rm -f "{remote.markers}/{image_id}"',
        lambda code, err: f"podman rmi {tag} on the vault exited {code}: {err}",
        hint="a container still uses it? 'podman ps -a' on the vault",
    )


class _Remote:
    """The vault's podman, through exec sessions (as root, or as the rootless user)."""

    def __init__(self, vault: Any, user: str | None) -> None:
        self.vault = vault
        self.user = user
        self.markers = USER_MARKERS if user else ROOT_MARKERS

    async def run(self, script: str, stdin: Any = None) -> tuple[int, bytes, bytes, int]:
        from flyvault.client.exec_request import ExecRequest, new_session_id
        from flyvault.client.session import ExecHooks, ExecSession

        out, err = bytearray(), bytearray()
        request = ExecRequest(
            session_id=new_session_id(), argv=("/bin/sh", "-c", script), user=self.user
        )
        session = ExecSession(self.vault, request, ExecHooks(out.extend, err.extend))
        task = asyncio.ensure_future(session.run())
        sent = 0
        try:
            if stdin is not None:
                sent = await _pump(stdin, session, task)
            else:
                session.close_stdin()
            exited = await task
        finally:
            if not task.done():
                task.cancel()
        return exited.exit_status, bytes(out), bytes(err), sent

    async def must(
        self, script: str, failure: Callable[[int, str], str], hint: str | None = None
    ) -> None:
        """Run ``script``; a non-zero exit is a VaultError worded by ``failure(code, the
        end of its stderr)``."""
        code, _, err, _ = await self.run(script)
        if code != 0:
            detail = err.decode(errors="replace").strip()[-300:]
            raise VaultError(failure(code, detail), hint=hint)

    async def require_podman(self) -> None:
        code, _, _, _ = await self.run("command -v podman >/dev/null")
        if code != 0:
            raise NotFoundError(
                "there is no podman on the vault",
                hint='install it there (a deploy plan\'s packages step: packages = ["podman"])',
            )

    async def image_id(self, ref: str) -> str | None:
        code, out, _, _ = await self.run(
            f"podman image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null"
        )
        if code != 0:
            return None
        return out.decode().strip().removeprefix("sha256:") or None

    async def present(self, image_id: str) -> bool:
        return await self.image_id(image_id) == image_id

    async def marked(self, image_id: str) -> bool:
        code, _, _, _ = await self.run(f'test -f "{self.markers}/{image_id}"')
        return code == 0

    async def remove(self, image_id: str) -> None:
        """Every name of a torn image, then the image; never a container (no -f): one that
        uses it is a refusal in words."""
        await self.must(
            f'rm -f "{self.markers}/{image_id}"\n'
            f"podman image exists {image_id} || exit 0\n"
            f"podman untag {image_id} && podman rmi {image_id} >/dev/null",
            lambda code, err: (
                f"image {image_id[:12]} on the vault was never verified (a load "
                f"cut short?) and cannot be removed: {err}"
            ),
            hint="a container uses it: remove the container on the vault, then copy again",
        )

    async def load(
        self, engine: str, image: str, on_bytes: Callable[[int], None] | None
    ) -> tuple[int, str | None]:
        """Stream ``engine save`` into the vault's load; (bytes sent, the digest when what
        the vault received is what was sent)."""
        import tempfile

        # stderr to a file: a pipe nobody reads until the end could fill and stall save.
        with tempfile.TemporaryFile() as errors:
            save = subprocess.Popen([engine, "save", image], stdout=subprocess.PIPE, stderr=errors)
            assert save.stdout is not None
            source = _HashingReader(save.stdout, on_bytes)
            try:
                code, out, err, sent = await self.run(_LOAD, stdin=source)
            finally:
                stopped_by_us = save.poll() is None
                if stopped_by_us:
                    save.kill()
                save.wait()
                save.stdout.close()
            errors.seek(0)
            detail = errors.read().decode(errors="replace").strip()[-500:]
        if code != 0:  # the vault's side first: a save killed because of it says nothing
            raise VaultError(
                f"podman load on the vault exited {code}: {err.decode(errors='replace')[-500:].strip()}"
            )
        if save.returncode != 0 and not stopped_by_us:
            raise VaultError(f"{engine} save {image} failed here: {detail}")
        match = re.search(rb"fly-vault-digest ([0-9a-f]{64})", out)
        received = match.group(1).decode() if match else None
        return sent, source.digest() if received == source.digest() else None

    async def finish(self, image_id: str, tag: str) -> None:
        await self.must(
            f"podman tag {shlex.quote(image_id)} {shlex.quote(tag)} && "
            f'mkdir -p "{self.markers}" && : > "{self.markers}/{image_id}"',
            lambda code, err: f"podman tag on the vault exited {code}: {err}",
        )


class _HashingReader:
    def __init__(self, stream: Any, on_bytes: Callable[[int], None] | None) -> None:
        self.stream = stream
        self.sha = hashlib.sha256()
        self.on_bytes = on_bytes

    def read(self) -> bytes:
        data: bytes = (
            self.stream.read1(CHUNK) if hasattr(self.stream, "read1") else self.stream.read(CHUNK)
        )
        self.sha.update(data)
        if self.on_bytes is not None and data:
            self.on_bytes(len(data))
        return data

    def digest(self) -> str:
        return self.sha.hexdigest()


async def _pump(source: _HashingReader, session: Any, task: asyncio.Future[Any]) -> int:
    """Copy ``source`` into the session's stdin with its backpressure; the byte count."""
    sent = 0
    while not task.done():
        data = await asyncio.to_thread(source.read)
        if not data:
            break
        session.send_stdin(data)
        sent += len(data)
        drained = asyncio.ensure_future(session.drain())
        # The command may end while input waits for room: then stop sending.
        await asyncio.wait({drained, task}, return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            drained.cancel()
            break
    session.close_stdin()
    return sent
