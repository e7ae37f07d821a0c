"""The ZMQ edge: ZmqSource (PULL or SUB input), the PUSH / preview-PUB sinks, and PreviewSubscriber (viewers).

Only translation and I/O live here; the wire format is `fm2s_stream.wire`. Messages are received
and sent with copy=False; nothing is ever unpickled. A malformed message is counted and logged via
`pipeline.reject` and the source keeps serving.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from urllib.parse import urlsplit

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..frame import Result
from ..liveview import LatestFrames, LiveFrame
from ..pipeline import Pipeline
from ..wire import WireError, decode, encode_result, pack_preview, unpack_preview
from .curve import CurveKeys, secure_client, secure_server

__all__ = ["PreviewPubSink", "PreviewSubscriber", "ZmqPushSink", "ZmqSource", "check_endpoint", "is_loopback"]

log = logging.getLogger(__name__)


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on 127.0.0.0/8, ::1 or localhost."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str, allow_remote: bool, encrypted: bool = False) -> str:
    """Validate an endpoint to bind; non-loopback ones need `allow_remote` and are warned about
    unless CurveZMQ encrypts and authenticates them."""
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"unsupported endpoint {endpoint!r}: use tcp://HOST:PORT, ipc:// or inproc://")
    if not is_loopback(endpoint):
        if not allow_remote:
            raise ValueError(
                f"{endpoint} is not a loopback address; pass --bind HOST to accept remote peers"
            )
        if not encrypted:
            log.warning("binding %s: reachable from other machines, unencrypted and unauthenticated "
                        "(use --curve KEYDIR)", endpoint)
    return endpoint


class ZmqSource:
    """Receives wire-format frames on a PULL (lossless) or SUB socket and submits them."""

    def __init__(
        self,
        endpoint: str,
        kind: str = "pull",
        bind: bool = True,
        context: zmq.Context | None = None,
        rcvhwm: int = 16,
        curve: CurveKeys | None = None,
    ) -> None:
        if kind not in ("pull", "sub"):
            raise ValueError("source kind must be 'pull' or 'sub'")
        self.endpoint, self.kind, self.bind = endpoint, kind, bind
        self.context = context or zmq.Context.instance()
        self.rcvhwm = rcvhwm
        self.curve = curve
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.received = 0
        self.malformed = 0

    def start(self, pipeline: Pipeline) -> None:
        """Open the socket and start the receiving thread."""
        self._thread = threading.Thread(target=self._run, args=(pipeline,), name="zmq-source", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError(f"ZMQ source on {self.endpoint} did not start")

    def _socket(self) -> zmq.Socket:
        sock = self.context.socket(zmq.PULL if self.kind == "pull" else zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * 8192 * 8192 + 65536)  # a hard cap before any parsing
        if self.kind == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self.curve is not None:
            (secure_server if self.bind else secure_client)(sock, self.curve)
        (sock.bind if self.bind else sock.connect)(self.endpoint)
        return sock

    def _run(self, pipeline: Pipeline) -> None:
        sock = self._socket()
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                parts = sock.recv_multipart(copy=False)
                self.received += 1
                try:
                    frame = decode([p.buffer for p in parts])
                except WireError as exc:
                    self.malformed += 1
                    pipeline.reject(exc.kind, str(exc))
                    continue
                # blocks while the queue is full: backpressure reaches the sender through ZMQ's HWM
                pipeline.submit(frame)
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        """Stop receiving; returns once the thread has submitted its last frame."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class ZmqPushSink:
    """Lossless output: each result as a 2-part message on a bound PUSH socket.

    While a receiver is connected, sending waits for it (backpressure). With no receiver connected
    at all, frames are counted as `no_receiver` instead of stalling the whole stream.
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None, sndhwm: int = 64,
                 curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.sndhwm = sndhwm
        self.curve = curve
        self.name = "zmq-push"
        self.sent = 0
        self.no_receiver = 0
        self.peers = 0
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None

    def open(self) -> None:
        """Bind the PUSH socket and watch connections on a monitor socket."""
        sock = self.context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.sndhwm)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.SNDTIMEO, 200)
        if self.curve is not None:
            secure_server(sock, self.curve)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        sock.bind(self.endpoint)
        self._sock = sock

    def _update_peers(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            self.peers += 1 if event == zmq.EVENT_ACCEPTED else -1 if event == zmq.EVENT_DISCONNECTED else 0
            self.peers = max(self.peers, 0)

    def write(self, result: Result) -> None:
        """Send, waiting for a connected receiver; count (not raise) when none is connected."""
        assert self._sock is not None
        parts = encode_result(result)
        while True:
            self._update_peers()
            if self.peers == 0:
                self.no_receiver += 1
                return
            try:
                self._sock.send_multipart(parts, copy=False)
                self.sent += 1
                return
            except zmq.Again:
                continue  # receiver slow: keep waiting while it is connected

    def close(self) -> None:
        """Close the sockets (lingering up to 2 s for queued frames)."""
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close()
        if self._monitor is not None:
            self._monitor.close(linger=0)

    def stats(self) -> dict[str, int]:
        """Counters for reports."""
        return {"sent": self.sent, "no_receiver": self.no_receiver, "peers": self.peers}


class PreviewPubSink:
    """Lossy live preview: each result packed into one message (denoised + raw pixels) on a bound PUB socket.

    Single-part so that subscribers can set ZMQ_CONFLATE and always see the newest frame.
    """

    def __init__(self, endpoint: str, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self.name = "zmq-preview"
        self._sock: zmq.Socket | None = None
        self.sent = 0

    def open(self) -> None:
        """Bind the PUB socket."""
        sock = self.context.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, 2)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            secure_server(sock, self.curve)
        sock.bind(self.endpoint)
        self._sock = sock

    def write(self, result: Result) -> None:
        """Publish without ever blocking (PUB drops for slow subscribers)."""
        assert self._sock is not None
        self._sock.send(pack_preview(result), copy=False)
        self.sent += 1

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(linger=0)



class PreviewSubscriber:
    """Connects to a `serve --preview` address and keeps the newest frame per channel in a `LatestFrames`.

    No ZMQ_CONFLATE: that keeps one message for all channels, so a 2-channel stream would show one.
    Instead a thread drains the socket as fast as messages come (only headers are parsed; pixels stay
    in ZMQ's buffers) and the board keeps the newest per channel. A malformed message is counted.
    """

    def __init__(self, endpoint: str, board: LatestFrames | None = None, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.board = board if board is not None else LatestFrames()
        self.context = context or zmq.Context.instance()
        self.curve = curve
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PreviewSubscriber:
        """Connect (ZMQ reconnects by itself if the server starts later or restarts) and start receiving."""
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 8)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * 2 * 8192 * 8192 + 65536)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self.curve is not None:
            secure_client(sock, self.curve)
        sock.connect(self.endpoint)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(sock,), name="preview-sub", daemon=True)
        self._thread.start()
        return self

    def _run(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                msg = sock.recv(copy=False)
                try:
                    p = unpack_preview(msg.buffer)
                except WireError as exc:
                    self.board.malformed += 1
                    log.warning("malformed preview message from %s: %s", self.endpoint, exc)
                    continue
                f = p.frame
                try:
                    self.board.put(LiveFrame(f.channel, f.pixels, p.raw, p.fm2s, f.frame_id, f.t))
                except Exception:  # a viewer's receiving thread must not die on one odd message
                    self.board.malformed += 1
                    log.exception("preview message from %s not shown", self.endpoint)
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        """Stop receiving and close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
