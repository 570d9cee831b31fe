"""Rootfs provisioning, storage side: safe streaming extraction and atomic activation.

``extract.StreamingExtractor`` unpacks an uploaded archive into a staging directory while
it arrives; ``store.RootfsStore`` owns the on-volume layout, seeds the persistent ``/root``
and ``/home``, swaps the staged rootfs in atomically and recovers from a crash at any point.
"""
