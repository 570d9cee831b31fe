"""``cp``'s progress line on a terminal: what it says early and at the end."""

from __future__ import annotations

from flyvault.cli.progress import ETA_AFTER, render_copy
from flyvault.client import CopyProgress


def test_no_eta_before_the_rate_means_something() -> None:
    """The first line said "ETA 467787 s": a few kB after the connection's round trips."""
    early = CopyProgress(4096, 1_000_000_000, 0, 10, None)
    assert "ETA   -- s" in render_copy(early, 0.2)
    later = CopyProgress(500_000_000, 1_000_000_000, 5, 10, None)
    line = render_copy(later, ETA_AFTER * 2)
    assert "ETA    2 s" in line and " 50.0%" in line and "files 5/10" in line
    unknown = CopyProgress(4096, None, 1, None, None)
    assert "ETA" not in render_copy(unknown, 5.0)
