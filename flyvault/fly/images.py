"""Image references as Docker reads them: ``registry/repository:tag@sha256:...``."""

from __future__ import annotations


def parse_image(ref: str) -> dict[str, str | None]:
    """Split ``registry/repo:tag@sha256:...`` the way Docker does."""
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    registry = None
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, ref = first, rest
    tag = None
    name, colon, maybe_tag = ref.rpartition(":")
    if colon and "/" not in maybe_tag:
        ref, tag = name, maybe_tag
    return {"registry": registry, "repository": ref, "tag": tag, "digest": digest}
