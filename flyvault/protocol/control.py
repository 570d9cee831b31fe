"""Sans-I/O state machines for the control stream (attestation, then setup).

Theory of operation
-------------------
One control stream per connection carries the whole exchange::

    client                                   server
    REQUEST_ATTESTATION(min, max)  ------>
                                   <------   ATTESTATION(version, state, runtime, boot id, jwt)
    (client verifies the JWT against this connection's TLS exporter; only then:)
    SETUP_REQUEST(token, rootfs)   ------>
                                   <------   [UPLOAD_READY]  (inline rootfs: the token matched)
    [ROOTFS_CHUNK ... ROOTFS_END]  ------>
                                   <------   [PROGRESS ...]
                                   <------   SETUP_COMPLETE(state, runtime, boot id) | ERROR
                                   <------   [ERROR]  (provisioning only: rolled back)
                                   <------   end of stream

After a provisioning the server answers SETUP_COMPLETE as soon as the new workload is up and
keeps the stream open until the end of its settle window: a clean end of the stream then
says it stayed up, an ERROR frame that it died inside the window and the previous rootfs was
restored. A client may stop listening after SETUP_COMPLETE; the server finishes regardless.

Both machines are driven the same way: ``receive_data(bytes)`` / ``receive_eof()`` feed what
the stream delivered, ``next_event()`` returns the next event (or ``None`` when more data is
needed), ``send_*`` methods queue frames and ``data_to_send()`` drains them. Nothing here
does I/O or reads a clock. A protocol violation by the peer raises ``RemoteProtocolError``
(the server side also queues an error frame for the peer first); calling a ``send_*`` method
in the wrong state raises ``LocalProtocolError``. Both leave the machine in ``FAILED``.

Until the server has accepted the access token, frames are capped at
``MAX_PREAUTH_PAYLOAD`` so an anonymous peer cannot make it allocate much.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from flyvault.errors import LocalProtocolError, RemoteProtocolError, VaultError, VersionMismatch
from flyvault.protocol.codec import Frame, FrameDecoder, encode_frame
from flyvault.protocol.constants import (
    ERROR_FRAME,
    MAX_PAYLOAD,
    MAX_PREAUTH_PAYLOAD,
    MAX_PROTOCOL_VERSION,
    MIN_PROTOCOL_VERSION,
    ControlFrame,
    RuntimeStatus,
    VmState,
)
from flyvault.protocol.messages import (
    Attestation,
    ErrorMessage,
    Progress,
    RequestAttestation,
    RootfsEnd,
    RootfsInline,
    SetupComplete,
    SetupRequest,
)

_FRAME_NAMES = {
    ControlFrame.REQUEST_ATTESTATION: "attestation request",
    ControlFrame.ATTESTATION: "attestation",
    ControlFrame.SETUP_REQUEST: "setup request",
    ControlFrame.SETUP_COMPLETE: "setup complete",
    ControlFrame.ROOTFS_CHUNK: "rootfs chunk",
    ControlFrame.ROOTFS_END: "rootfs end",
    ControlFrame.PROGRESS: "progress",
    ControlFrame.UPLOAD_READY: "upload ready",
    ERROR_FRAME: "error",
}

#: The original's CONTROL_ERROR code. A protocol-1 server answers our versioned request
#: with it, which we turn into a clear version mismatch instead of "unexpected frame".
_LEGACY_ERROR_FRAME = 0x05


def frame_name(frame_type: int) -> str:
    return _FRAME_NAMES.get(frame_type, f"unknown frame type 0x{frame_type:02x}")


# Events --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AttestationRequested:
    """The client asked for an attestation; ``version`` is the negotiated protocol version."""

    version: int


@dataclass(frozen=True, slots=True)
class AttestationReceived:
    attestation: Attestation


@dataclass(frozen=True, slots=True)
class SetupRequested:
    request: SetupRequest


@dataclass(frozen=True, slots=True)
class RootfsChunkReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class RootfsUploaded:
    """Every declared byte arrived; ``sha256`` is the client's digest of the archive."""

    sha256: bytes


@dataclass(frozen=True, slots=True)
class UploadReady:
    """The server accepted the token; send the rootfs chunks now."""


@dataclass(frozen=True, slots=True)
class ProgressReported:
    progress: Progress


@dataclass(frozen=True, slots=True)
class SetupCompleted:
    complete: SetupComplete


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The peer refused; ``error.to_exception()`` gives the matching exception."""

    error: ErrorMessage


@dataclass(frozen=True, slots=True)
class VersionRejected:
    """No common protocol version; an error frame has been queued for the client."""

    client_min: int
    client_max: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer finished the stream cleanly at a frame boundary."""


ControlEvent = (
    AttestationRequested
    | AttestationReceived
    | SetupRequested
    | RootfsChunkReceived
    | RootfsUploaded
    | UploadReady
    | ProgressReported
    | SetupCompleted
    | ErrorReceived
    | VersionRejected
    | StreamEnded
)


class _Machine:
    """Shared plumbing: frame decoding, the outgoing buffer and the FAILED poisoning."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(MAX_PREAUTH_PAYLOAD)
        self._outgoing = bytearray()
        self._ended = False

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        self._decoder.feed_eof()

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _queue(self, frame_type: int, payload: bytes = b"") -> None:
        self._outgoing += encode_frame(frame_type, payload)

    def _next_frame(self) -> Frame | StreamEnded | None:
        frame = self._decoder.next_frame()
        if frame is None and self._decoder.finished and not self._ended:
            self._ended = True
            return StreamEnded()
        return frame


class ClientState(enum.Enum):
    IDLE = "idle"
    AWAIT_ATTESTATION = "await attestation"
    ATTESTED = "attested"
    AWAIT_RESULT = "await setup result"
    AWAIT_UPLOAD_READY = "await upload ready"
    UPLOADING = "uploading rootfs"
    COMPLETE = "complete"
    FAILED = "failed"


class ControlClient(_Machine):
    """The client's half of the control exchange."""

    def __init__(
        self, min_version: int = MIN_PROTOCOL_VERSION, max_version: int = MAX_PROTOCOL_VERSION
    ) -> None:
        super().__init__()
        self.state = ClientState.IDLE
        self._min_version = min_version
        self._max_version = max_version
        self._upload_left = 0
        self.negotiated_version: int | None = None

    def request_attestation(self) -> None:
        self._require(ClientState.IDLE, "request an attestation")
        self._queue(
            ControlFrame.REQUEST_ATTESTATION,
            RequestAttestation(self._min_version, self._max_version).encode(),
        )
        self.state = ClientState.AWAIT_ATTESTATION

    def send_setup(self, request: SetupRequest) -> None:
        """Send the token. Only legal once the caller has verified the attestation."""
        self._require(ClientState.ATTESTED, "send the setup request")
        self._queue(ControlFrame.SETUP_REQUEST, request.encode())
        if isinstance(request.rootfs, RootfsInline):
            self._upload_left = request.rootfs.size
            self.state = ClientState.AWAIT_UPLOAD_READY
        else:
            self.state = ClientState.AWAIT_RESULT

    def send_rootfs_chunk(self, data: bytes) -> None:
        self._require(ClientState.UPLOADING, "send a rootfs chunk")
        if len(data) > self._upload_left:
            self.state = ClientState.FAILED
            raise LocalProtocolError(
                f"rootfs chunk of {len(data)} bytes exceeds the {self._upload_left} bytes left "
                "of the declared size"
            )
        if len(data) > MAX_PAYLOAD:
            raise LocalProtocolError(f"rootfs chunk larger than {MAX_PAYLOAD} bytes")
        self._upload_left -= len(data)
        self._queue(ControlFrame.ROOTFS_CHUNK, data)

    def end_rootfs(self, sha256: bytes) -> None:
        self._require(ClientState.UPLOADING, "end the rootfs upload")
        if self._upload_left:
            self.state = ClientState.FAILED
            raise LocalProtocolError(
                f"rootfs upload ended {self._upload_left} bytes short of its declared size"
            )
        self._queue(ControlFrame.ROOTFS_END, RootfsEnd(sha256).encode())
        self.state = ClientState.AWAIT_RESULT

    def next_event(self) -> ControlEvent | None:
        try:
            item = self._next_frame()
        except RemoteProtocolError:
            self.state = ClientState.FAILED
            raise
        if item is None:
            return None
        if isinstance(item, StreamEnded):
            if self.state not in (ClientState.COMPLETE, ClientState.FAILED):
                self.state = ClientState.FAILED
                raise RemoteProtocolError(
                    f"server closed the control stream while we were in state '{self.state.value}'"
                )
            return item
        try:
            return self._handle(item)
        except RemoteProtocolError:
            self.state = ClientState.FAILED
            raise

    def _handle(self, frame: Frame) -> ControlEvent:
        if frame.type == ERROR_FRAME:
            self.state = ClientState.FAILED
            return ErrorReceived(ErrorMessage.decode(frame.payload))
        if self.state is ClientState.AWAIT_ATTESTATION:
            if frame.type == _LEGACY_ERROR_FRAME:
                raise VersionMismatch(
                    "protocol version mismatch: the server speaks the original fly-vault "
                    f"protocol 1, this client speaks {self._min_version}..{self._max_version}",
                    hint="deploy an image built by this fly-vault (fly-vault build)",
                )
            self._expect(frame, ControlFrame.ATTESTATION)
            attestation = Attestation.decode(frame.payload)
            version = attestation.protocol_version
            if not self._min_version <= version <= self._max_version:
                raise VersionMismatch(
                    f"protocol version mismatch: server={version} "
                    f"client={self._min_version}..{self._max_version}"
                )
            self.negotiated_version = version
            self.state = ClientState.ATTESTED
            return AttestationReceived(attestation)
        if self.state is ClientState.AWAIT_UPLOAD_READY:
            self._expect(frame, ControlFrame.UPLOAD_READY)
            self.state = ClientState.UPLOADING
            return UploadReady()
        if self.state in (ClientState.AWAIT_RESULT, ClientState.UPLOADING):
            if frame.type == ControlFrame.PROGRESS:
                return ProgressReported(Progress.decode(frame.payload))
            if self.state is ClientState.AWAIT_RESULT:
                self._expect(frame, ControlFrame.SETUP_COMPLETE)
                self.state = ClientState.COMPLETE
                return SetupCompleted(SetupComplete.decode(frame.payload))
        raise RemoteProtocolError(
            f"unexpected {frame_name(frame.type)} frame from the server in state "
            f"'{self.state.value}'"
        )

    def _expect(self, frame: Frame, expected: ControlFrame) -> None:
        if frame.type != expected:
            raise RemoteProtocolError(
                f"expected {frame_name(expected)} frame, got {frame_name(frame.type)}"
            )

    def _require(self, state: ClientState, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {action} in state '{self.state.value}'")


class ServerState(enum.Enum):
    AWAIT_REQUEST = "await attestation request"
    ATTESTING = "attesting"
    AWAIT_SETUP = "await setup request"
    CHECKING_TOKEN = "checking token"
    RECEIVING_ROOTFS = "receiving rootfs"
    SETTING_UP = "setting up"
    COMPLETE = "complete"
    FAILED = "failed"


_PAUSED_STATES = frozenset(
    {
        ServerState.FAILED,
        ServerState.ATTESTING,
        ServerState.CHECKING_TOKEN,
        ServerState.SETTING_UP,
    }
)


class ControlServer(_Machine):
    """The server's half of the control exchange."""

    def __init__(
        self, min_version: int = MIN_PROTOCOL_VERSION, max_version: int = MAX_PROTOCOL_VERSION
    ) -> None:
        super().__init__()
        self.state = ServerState.AWAIT_REQUEST
        self._min_version = min_version
        self._max_version = max_version
        self._upload_left = 0
        self._upload_size = 0
        self.negotiated_version: int | None = None

    # Outgoing ---------------------------------------------------------------------------

    def send_attestation(
        self, vm_state: VmState, runtime_status: RuntimeStatus, boot_id: str, jwt: str
    ) -> None:
        self._require(ServerState.ATTESTING, "send the attestation")
        assert self.negotiated_version is not None
        self._queue(
            ControlFrame.ATTESTATION,
            Attestation(self.negotiated_version, vm_state, runtime_status, boot_id, jwt).encode(),
        )
        self.state = ServerState.AWAIT_SETUP

    def accept_token(self) -> None:
        """The token matched: accept the upload (if any) with the authenticated frame limit."""
        self._require(ServerState.CHECKING_TOKEN, "accept the token")
        if self._upload_size:
            self._decoder.max_payload = MAX_PAYLOAD
            self._queue(ControlFrame.UPLOAD_READY)
            self.state = ServerState.RECEIVING_ROOTFS
        else:
            self.state = ServerState.SETTING_UP

    def send_progress(self, progress: Progress) -> None:
        if self.state not in (ServerState.RECEIVING_ROOTFS, ServerState.SETTING_UP):
            raise LocalProtocolError(f"cannot send progress in state '{self.state.value}'")
        self._queue(ControlFrame.PROGRESS, progress.encode())

    def send_setup_complete(self, complete: SetupComplete) -> None:
        self._require(ServerState.SETTING_UP, "complete the setup")
        self._queue(ControlFrame.SETUP_COMPLETE, complete.encode())
        self.state = ServerState.COMPLETE

    def send_rolled_back(self, exc: VaultError) -> None:
        """After SETUP_COMPLETE of a provisioning: the new workload died inside its settle
        window and the previous rootfs is back. Only legal in COMPLETE; the exchange is over
        afterwards. (A clean end of the stream instead says the workload stayed up.)"""
        self._require(ServerState.COMPLETE, "report a rollback")
        self._queue(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
        self.state = ServerState.FAILED

    def refuse(self, exc: VaultError) -> None:
        """Refuse with the error frame ``exc``'s class declares; legal in every state but
        COMPLETE. The exchange is over afterwards."""
        if self.state is ServerState.COMPLETE:
            raise LocalProtocolError("cannot send an error after the setup completed")
        self._queue(ERROR_FRAME, ErrorMessage.from_exception(exc).encode())
        self.state = ServerState.FAILED

    # Incoming ---------------------------------------------------------------------------

    def next_event(self) -> ControlEvent | None:
        """The next event, or ``None`` if more data is needed or the machine is paused.

        It pauses (returns ``None`` without consuming input) while the application owes an
        answer: the attestation, the token decision, or the setup result.
        """
        if self.state in _PAUSED_STATES:
            return None
        try:
            item = self._next_frame()
            if item is None:
                return None
            if isinstance(item, StreamEnded):
                if self.state in (ServerState.AWAIT_REQUEST, ServerState.AWAIT_SETUP):
                    # The client gave up between frames: nothing to answer.
                    self.state = ServerState.FAILED
                elif self.state is ServerState.RECEIVING_ROOTFS:
                    raise RemoteProtocolError(
                        f"client ended the stream with {self._upload_left} rootfs bytes missing"
                    )
                return item
            return self._handle(item)
        except RemoteProtocolError as exc:
            if self.state is ServerState.COMPLETE:
                # A frame after the setup completed: no error frame may follow the result,
                # but it is still the peer's violation (not a LocalProtocolError).
                self.state = ServerState.FAILED
            elif self.state is not ServerState.FAILED:
                self.refuse(RemoteProtocolError(f"control stream error: {exc.message}"))
            raise

    def _handle(self, frame: Frame) -> ControlEvent:
        state = self.state
        if state is ServerState.AWAIT_REQUEST:
            self._expect(frame, ControlFrame.REQUEST_ATTESTATION)
            request = RequestAttestation.decode(frame.payload)
            low = max(request.min_version, self._min_version)
            high = min(request.max_version, self._max_version)
            if low > high:
                self.refuse(
                    VersionMismatch(
                        f"protocol version mismatch: client speaks {request.min_version}.."
                        f"{request.max_version}, server speaks "
                        f"{self._min_version}..{self._max_version}"
                    )
                )
                return VersionRejected(request.min_version, request.max_version)
            self.negotiated_version = high
            self.state = ServerState.ATTESTING
            return AttestationRequested(high)
        if state is ServerState.AWAIT_SETUP:
            self._expect(frame, ControlFrame.SETUP_REQUEST)
            request_setup = SetupRequest.decode(frame.payload)
            if isinstance(request_setup.rootfs, RootfsInline):
                if request_setup.rootfs.size == 0:
                    raise RemoteProtocolError("setup request: inline rootfs of 0 bytes")
                self._upload_size = self._upload_left = request_setup.rootfs.size
            self.state = ServerState.CHECKING_TOKEN
            return SetupRequested(request_setup)
        if state is ServerState.RECEIVING_ROOTFS:
            if frame.type == ControlFrame.ROOTFS_CHUNK:
                if len(frame.payload) > self._upload_left:
                    raise RemoteProtocolError(
                        "rootfs upload is longer than its declared size "
                        f"of {self._upload_size} bytes"
                    )
                self._upload_left -= len(frame.payload)
                return RootfsChunkReceived(frame.payload)
            self._expect(frame, ControlFrame.ROOTFS_END)
            if self._upload_left:
                raise RemoteProtocolError(
                    f"rootfs upload ended {self._upload_left} bytes short of its declared size"
                )
            end = RootfsEnd.decode(frame.payload)
            self.state = ServerState.SETTING_UP
            return RootfsUploaded(end.sha256)
        raise RemoteProtocolError(
            f"unexpected {frame_name(frame.type)} frame in state '{state.value}'"
        )

    def _expect(self, frame: Frame, expected: ControlFrame) -> None:
        if frame.type != expected:
            raise RemoteProtocolError(
                f"expected {frame_name(expected)}, got {frame_name(frame.type)}"
            )

    def _require(self, state: ServerState, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {action} in state '{self.state.value}'")
