"""Long local operations (reprovision, tenant create/delete/update-image) as jobs.

A job runs in a task of its own; the tool call that started it waits for at most its
``wait_seconds`` and then returns the job id, and ``job_status`` waits again. Cancelling the
call that started a job (before it returned) cancels the job: a reprovision keeps the old
rootfs, a tenant create rolls back, an image rollout stops where it can be resumed.

What the admin code prints (plans, progress lines, warnings) is captured into the job's
log instead of going to this process's stdout/stderr: ``sys.stdout`` and ``sys.stderr``
are routed per task through a context variable, so only a job's own prints are captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import secrets
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from flyvault.errors import NotFoundError, VaultError

from .hints import for_agent
from .models import JobResult, Progress
from .progress import Reporter, human_bytes

log = logging.getLogger("mcp_server")

LOG_LINES = 200
HEARTBEAT = 2.0
MAX_JOBS = 100

_CAPTURE: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "fly_vault_mcp_capture", default=None
)


class _RoutedStream:
    """Writes go to the current job's log when there is one, else to the real stream."""

    def __init__(self, original: Any) -> None:
        self._original = original

    def write(self, text: str) -> int:
        sink = _CAPTURE.get()
        if sink is None:
            return int(self._original.write(text))
        sink(text)
        return len(text)

    def flush(self) -> None:
        if _CAPTURE.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _install_routing() -> None:
    if not isinstance(sys.stdout, _RoutedStream):
        sys.stdout = _RoutedStream(sys.stdout)
    if not isinstance(sys.stderr, _RoutedStream):
        sys.stderr = _RoutedStream(sys.stderr)


@dataclass(eq=False)
class Job:
    id: str
    kind: str
    target: str
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    phase: tuple[str, int, int] | None = None
    result: dict[str, Any] | None = None
    error: VaultError | None = None
    task: asyncio.Task[None] | None = None
    _partial: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()

    def write(self, text: str) -> None:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.log.append(line.rstrip())

    def on_phase(self, phase: str, done: int, total: int) -> None:
        self.phase = (phase, done, total)
        self.notify()


class JobRegistry:
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def start(
        self, kind: str, target: str, work: Callable[[Job], Awaitable[dict[str, Any]]]
    ) -> Job:
        _install_routing()
        self._prune()
        job = Job(id=f"job-{secrets.token_hex(6)}", kind=kind, target=target)

        async def run() -> None:
            _CAPTURE.set(job.write)
            try:
                job.result = await work(job)
            except VaultError as exc:
                job.error = exc
            except asyncio.CancelledError:
                job.error = VaultError(f"{kind} was cancelled")
                raise
            except Exception as exc:
                log.exception("job %s (%s) failed", job.id, kind)
                job.error = VaultError(f"internal error in {kind}: {exc!r}")
            finally:
                if job._partial.strip():
                    job.log.append(job._partial.rstrip())
                job._partial = ""
                job.finished_at = time.monotonic()
                job.notify()

        # The job's own context: its prints are captured, nobody else's.
        job.task = asyncio.get_running_loop().create_task(run(), context=contextvars.copy_context())
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(
                f"job {job_id} not found",
                hint="jobs are kept by the MCP server process that started them, for its "
                "lifetime (the newest 100)",
            )
        return job

    def _prune(self) -> None:
        finished = [j for j in self._jobs.values() if not j.running]
        for job in finished[: max(0, len(self._jobs) - MAX_JOBS + 1)]:
            self._jobs.pop(job.id, None)

    async def follow(
        self, job: Job, ctx: Any | None, wait_seconds: float, *, foreground: bool
    ) -> JobResult:
        """Wait for ``job`` up to ``wait_seconds``; cancelling a foreground call cancels it."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        done = False
        try:
            async with Reporter(ctx) as reporter:
                while job.running:
                    remaining = began + wait_seconds - loop.time()
                    if remaining <= 0:
                        break
                    await job.changed(min(remaining, HEARTBEAT))
                    reporter.update(*_progress_of(job, loop.time() - began, wait_seconds))
            done = True
        finally:
            if foreground and not done and job.running and job.task is not None:
                log.info("job %s: the call that started it was cancelled; cancelling", job.id)
                job.task.cancel()
        return self.result(job)

    def result(self, job: Job) -> JobResult:
        phase = job.phase
        error = job.error
        running = job.running
        if running:
            next_step = f'still running; wait with job_status(job_id="{job.id}", wait_seconds=30)'
        elif error is not None:
            next_step = None
        else:
            next_step = (job.result or {}).get("next_step")
        value = JobResult(
            job_id=job.id,
            kind=job.kind,
            target=job.target,
            running=running,
            ok=None if running else error is None,
            elapsed_seconds=round((job.finished_at or time.monotonic()) - job.started_at, 3),
            progress=Progress(phase=phase[0], done=phase[1], total=phase[2]) if phase else None,
            result=None if running else job.result,
            error=error.message if error is not None else None,
            hint=for_agent(error.hint, job.target) if error is not None and error.hint else None,
            log=list(job.log)[-40:],
            next_step=next_step,
        )
        return value


def _progress_of(job: Job, waited: float, wait_seconds: float) -> tuple[float, float | None, str]:
    phase = job.phase
    if phase is not None:
        name, done, total = phase
        if name == "upload" and total:
            return done, total, f"{job.kind}: uploading {human_bytes(done)} of {human_bytes(total)}"
        return (
            waited,
            None,
            f"{job.kind}: {name} {done}/{total}" if total else f"{job.kind}: {name}",
        )
    last = job.log[-1] if job.log else "running"
    return waited, wait_seconds, f"{job.kind}: {last[:120]}"
