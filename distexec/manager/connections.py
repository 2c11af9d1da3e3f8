"""The door: every socket of the task manager, from accept to close.

Owns the listener's accept loop, the connections (:class:`Conn`), the handshake (bounded and
with deadlines, see :mod:`.handshakes`), refusals, and the bytes in and out: frames read from
main and client connections, bytes from control connections, queued output written as sockets
allow. It knows which *channel* a connection is (a worker's main, control or client connection,
or a ``distexec status`` query) and hands what arrives to the room that deals with it; it decides
nothing about workers or tasks. Manager thread only.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..errors import HandshakeError, ProtocolError
from .handshakes import PendingHandshakes, RefusalLog

if TYPE_CHECKING:
    from .loop import Manager
    from .lifecycle import WorkerHandle

logger = logging.getLogger(__name__)

# A connection must complete the handshake within this many seconds or it is dropped.
HANDSHAKE_TIMEOUT = 10.0
# Connections still in their handshake (not yet proven to hold the key). When a new one would
# exceed this, the oldest is dropped: a real worker completes its handshake in one round trip,
# so only a peer that stalls loses its place. Each costs about 1 KiB here until it completes,
# closes or times out.
MAX_PENDING_HANDSHAKES = 256
# Refused connections are logged individually up to this many per REFUSAL_LOG_WINDOW seconds,
# then counted and summarised, so that a flood of junk cannot flood the log.
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW = 10.0
# Accepting failed for lack of file descriptors or memory: stop accepting for this long.
ACCEPT_PAUSE = 0.1
# Upper bound on bytes read from one connection per loop turn, for fairness between workers.
READ_BUDGET = 8 * 1024 * 1024

MAIN, CONTROL, CLIENT = "main", "control", "client"


class Conn:
    """One socket to a worker (or to something pretending to be one)."""

    __slots__ = ("sock", "peer", "open", "hs_buf", "nonce_m", "decoder", "out", "worker_id",
                 "want_write", "close_after_flush", "handle", "channel", "children")

    def __init__(self, sock: Any, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.open = False  # handshake completed
        self.hs_buf = bytearray()
        self.nonce_m = protocol.new_nonce()
        # The frame decoder (and its buffer) exists only once the peer has proven it holds the
        # key: before that a connection costs a few hundred bytes (see Door.opened).
        self.decoder: protocol.FrameDecoder | None = None
        self.out = protocol.OutQueue()
        self.worker_id: int | None = None
        self.want_write = False
        self.close_after_flush = False
        self.handle: WorkerHandle | None = None  # set once the handshake names the worker
        self.channel = MAIN  # or CONTROL (heartbeats, ABORT) or CLIENT (its tasks' requests)
        self.children: dict[int, Any] | None = None  # client: request id -> child task

    def __repr__(self) -> str:
        return f"<Conn {self.channel} {self.peer} worker={self.worker_id}>"


class Door:
    """Accepts connections, runs handshakes, moves bytes; routes what arrives."""

    def __init__(self, m: Manager, listener: socket.socket,
                 selector: selectors.BaseSelector) -> None:
        self.m = m
        self.listener = listener
        self.selector = selector
        self.conns: set[Conn] = set()
        # Connections in their handshake -> deadline (accept order is deadline order).
        self._pending = PendingHandshakes(MAX_PENDING_HANDSHAKES, HANDSHAKE_TIMEOUT)
        self._handshake_timer = False  # a deadline is armed for the oldest pending handshake
        self._refusals = RefusalLog(logger, REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW)

    def open(self) -> None:
        self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    # ---------------------------------------------------------------- accepting
    def _on_accept(self, sock: Any, mask: int) -> None:
        for _ in range(64):
            try:
                conn_sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors or memory: the listener stays readable, so pause
                # instead of spinning, and make room by dropping the oldest handshake.
                self.log_refusal("accepting a connection failed: %s; not accepting for "
                                 "%g s", exc, ACCEPT_PAUSE)
                self._drop_oldest_handshake("dropped to make room for new connections")
                try:
                    self.selector.unregister(self.listener)
                except (KeyError, ValueError):
                    return
                self.m.at(time.monotonic() + ACCEPT_PAUSE, self._resume_accepting)
                return
            conn_sock.setblocking(False)
            conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol.set_keepalive(conn_sock)
            conn = Conn(conn_sock, f"{addr[0]}:{addr[1]}")
            if self._pending.full():
                self._drop_oldest_handshake(f"{MAX_PENDING_HANDSHAKES} connections were waiting "
                                            "to complete their handshake; dropped the oldest")
            self.conns.add(conn)
            self.selector.register(conn_sock, selectors.EVENT_READ, self._io_handler(conn))
            self._pending.add(conn, time.monotonic())
            self._arm_handshake_timer()
            self.send(conn, [protocol.make_hello(conn.nonce_m)])

    def _io_handler(self, conn: Conn) -> Callable[[Any, int], None]:
        def handler(sock: Any, mask: int) -> None:
            if mask & selectors.EVENT_WRITE:
                self.flush(conn)
            if mask & selectors.EVENT_READ and conn in self.conns:
                if not conn.open:
                    self._read_handshake(conn)
                elif conn.channel is CONTROL:
                    self.read_control(conn)
                else:
                    self.read_frames(conn)
        return handler

    def _resume_accepting(self) -> None:
        if self.m.terminating or self.listener.fileno() < 0:
            return
        try:
            self.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        except KeyError:
            pass  # registered already

    def _drop_oldest_handshake(self, reason: str) -> None:
        oldest = self._pending.oldest()
        if oldest is not None:
            self.reject(oldest, reason)

    def _arm_handshake_timer(self) -> None:
        if not self._handshake_timer:
            deadline = self._pending.next_deadline()
            if deadline is not None:
                self._handshake_timer = True
                self.m.at(deadline, self._expire_handshakes)

    def _expire_handshakes(self) -> None:
        """Drop the connections whose handshake is overdue."""
        self._handshake_timer = False
        for conn in self._pending.overdue(time.monotonic()):
            self.reject(conn, f"no complete handshake within {HANDSHAKE_TIMEOUT:g} s")
        self._arm_handshake_timer()

    # ---------------------------------------------------------------- the handshake
    def _read_handshake(self, conn: Conn) -> None:
        try:
            # Never more than the handshake can hold: header plus the largest info.
            data = conn.sock.recv(protocol.AUTH.size + protocol.MAX_HANDSHAKE_JSON + 1
                                  - len(conn.hs_buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.reject(conn, f"connection error during the handshake: {exc}")
            return
        if not data:
            self.reject(conn, "closed during the handshake"
                        + (f" after sending {len(conn.hs_buf)} bytes" if conn.hs_buf else ""))
            return
        buf = conn.hs_buf
        buf += data
        try:
            if len(buf) >= 4 and bytes(buf[:4]) != protocol.MAGIC_AUTH:
                raise ProtocolError(f"not a distexec worker (it sent {bytes(buf[:16])!r})")
            if len(buf) < protocol.AUTH.size:
                return
            header = protocol.parse_auth_header(bytes(buf[:protocol.AUTH.size]))
            need = protocol.AUTH.size + header.info_len
            if len(buf) < need:
                return
            if len(buf) > need:
                raise ProtocolError("it sent data before the handshake completed")
            # Its handshake is complete, whatever the verdict: no longer pending.
            self._pending.done(conn)
            info = protocol.verify_auth(self.m.key, conn.nonce_m, header,
                                        bytes(buf[protocol.AUTH.size:need]))
        except HandshakeError as exc:
            status = (protocol.STATUS_BAD_KEY if "authentication" in str(exc)
                      else protocol.STATUS_VERSION_MISMATCH)
            self.refuse(conn, status, str(exc), b"")
            return
        except ProtocolError as exc:
            self.reject(conn, str(exc))
            return
        channel = info.get("channel")
        if channel == "control":
            self.m.watchdog.control_connected(conn, info, header.nonce_w)
        elif channel == "status":
            self.welcome(conn, header.nonce_w)
            if conn in self.conns:
                conn.close_after_flush = True
                self.send(conn, protocol.encode_frame(protocol.STATUS,
                                                      (self.m.status.report(),)))
        elif channel == "client":
            self.m.children.client_connected(conn, info, header.nonce_w)
        else:
            self.m.fleet.worker_connected(conn, info, header.nonce_w)

    def welcome(self, conn: Conn, nonce_w: bytes, info: dict[str, Any] | None = None) -> None:
        """Accept a peer that proved it holds the key."""
        self.send(conn, [protocol.make_welcome(self.m.key, conn.nonce_m, nonce_w,
                                               protocol.STATUS_OK, info or {})])

    def opened(self, conn: Conn, handle: WorkerHandle, channel: str) -> None:
        """The peer proved it holds the key and is one of ``handle``'s connections: from now
        on it speaks frames (or, on the control channel, heartbeat bytes)."""
        conn.open = True
        conn.hs_buf = bytearray()
        conn.channel = channel
        conn.handle = handle
        conn.worker_id = handle.worker_id
        if channel is not CONTROL:
            conn.decoder = protocol.FrameDecoder(self.m.config.max_message_size
                                                 + protocol.FRAME_OVERHEAD)

    def log_refusal(self, msg: str, *args: Any) -> None:
        """Log a refused connection, at most REFUSAL_LOG_BURST times per window."""
        self._refusals.log(time.monotonic(), msg, *args)

    def reject(self, conn: Conn, reason: str) -> None:
        """Close a connection that has not proven it holds the key."""
        self.log_refusal("refused connection from %s: %s", conn.peer, reason)
        self.close(conn)

    def refuse(self, conn: Conn, status: int, reason: str, nonce_w: bytes) -> None:
        """Tell a peer why it is refused, then close."""
        self.log_refusal("refused connection from %s: %s", conn.peer, reason)
        self.send(conn, [protocol.make_welcome(self.m.key, conn.nonce_m, nonce_w, status,
                                               {"error": reason})])
        conn.close_after_flush = True
        if not conn.out:
            self.close(conn)

    # ---------------------------------------------------------------- reading
    def read_frames(self, conn: Conn) -> None:
        budget = READ_BUDGET
        decoder = conn.decoder
        handle = conn.handle
        assert handle is not None and decoder is not None
        while budget > 0:
            try:
                n = conn.sock.recv_into(decoder.recv_buffer())
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.disconnected(conn, f"connection error: {exc}")
                return
            if n == 0:
                self.disconnected(conn, "connection closed")
                return
            handle.last_seen = time.monotonic()
            budget -= n
            try:
                frames = decoder.feed(n)
            except (ProtocolError, MemoryError) as exc:
                what = (str(exc) if type(exc) is not MemoryError else
                        "not enough memory for the frame it announced")
                logger.error("worker %s sent a frame that cannot be taken (%s); dropping its "
                             "connection", conn.worker_id, what)
                # Its next result was in that frame: the loss is charged to that task, so a
                # result that cannot be taken fails its task after max_retries, not loops.
                handle.bad_frame = True
                self.disconnected(conn, f"protocol error: {what}")
                return
            for frame in frames:
                self.m.on_frame(conn, frame)
                if conn not in self.conns:
                    return

    def read_control(self, conn: Conn) -> None:
        """Bytes on a control connection: heartbeats, stack dumps, answers."""
        chunks = []
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.disconnected(conn, f"connection error: {exc}")
                return
            if not data:
                self.disconnected(conn, "connection closed")
                return
            chunks.append(data)
        if chunks:
            assert conn.handle is not None
            self.m.watchdog.control_bytes(conn.handle, b"".join(chunks))

    def read_now(self, handle: WorkerHandle) -> None:
        """Read what is waiting from a worker's control and main connections (this thread may
        have been starved, and a worker that looks silent may not be)."""
        if handle.ctrl is not None and handle.ctrl in self.conns:
            self.read_control(handle.ctrl)
        if handle.conn is not None and handle.conn in self.conns:
            self.read_frames(handle.conn)

    def disconnected(self, conn: Conn, why: str) -> None:
        """A connection ended (or must end): close it and tell the room of its channel."""
        self.close(conn)
        if conn.channel is CONTROL:
            self.m.watchdog.control_closed(conn, why)
        elif conn.channel is CLIENT:
            self.m.children.client_closed(conn, why)
        elif conn.handle is not None:
            self.m.fleet.disconnected(conn, why)

    # ---------------------------------------------------------------- writing
    def send(self, conn: Conn, parts: list[Any]) -> None:
        conn.out.extend(parts)
        self.flush(conn)

    def send_open(self, conn: Conn | None, parts: list[Any]) -> bool:
        """Send on ``conn`` if it is open; False if it is not."""
        if conn is None or conn not in self.conns:
            return False
        self.send(conn, parts)
        return True

    def flush(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        try:
            conn.out.write_to(conn.sock)
        except OSError as exc:
            self.disconnected(conn, f"connection error while sending: {exc}")
            return
        if conn.out and not conn.want_write:
            conn.want_write = True
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self._io_handler(conn))
        elif not conn.out:
            if conn.want_write:
                conn.want_write = False
                self.selector.modify(conn.sock, selectors.EVENT_READ, self._io_handler(conn))
            if conn.close_after_flush:
                self.close(conn)

    def close(self, conn: Conn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        self._pending.done(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def close_all(self) -> None:
        for conn in list(self.conns):
            self.close(conn)
