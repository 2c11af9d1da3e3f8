"""The worker's blocking connections to the task manager: connecting, the client side of the
handshake, and the *client* connection its tasks use (:class:`TaskClient`).

The client connection carries what task code asks of the task manager (shared data, child tasks,
see :mod:`distexec.context`). It is opened the first time a task asks; any thread may send a
request, the ``distexec-client`` thread reads the answers, and ``distexec-client-results``
completes child tasks' futures, so that user code in their callbacks cannot block the reader.
This module never imports the manager, the executor or paramiko.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import protocol
from ._version import versions

if TYPE_CHECKING:
    from .worker import Worker

logger = logging.getLogger("distexec.worker")

__all__ = ["TaskClient", "client_handshake", "connect", "worker_info"]

# Upper bound on connecting the client connection (it normally takes one round trip).
CLIENT_SETUP_TIMEOUT = 30.0


def worker_info(worker_id: int | None) -> dict[str, Any]:
    """What a worker tells the manager about itself in the handshake."""
    return {
        "worker_id": worker_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        **versions(),
        "executable": sys.executable,
        "cpus": os.cpu_count() or 1,
    }


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the task manager closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def client_handshake(
    sock: socket.socket, key: bytes, info: dict[str, Any]
) -> dict[str, Any]:
    """Worker side of the handshake (blocking). Returns the manager's welcome message."""
    nonce_m = protocol.parse_hello(_recv_exactly(sock, protocol.HELLO.size))
    nonce_w = protocol.new_nonce()
    sock.sendall(protocol.make_auth(key, nonce_m, nonce_w, info))
    header = protocol.parse_welcome_header(_recv_exactly(sock, protocol.WELCOME.size))
    blob = _recv_exactly(sock, header.msg_len) if header.msg_len else b""
    return protocol.verify_welcome(key, nonce_m, nonce_w, header, blob)


def connect(host: str, port: int, timeout: float) -> socket.socket:
    """Connect, retrying refused or unreachable attempts with a backoff until ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return socket.create_connection((host, port), timeout=max(1.0, timeout))
        except OSError:
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)  # nothing to wait on but time: the manager is not listening yet
        delay = min(delay * 2, 2.0)


class TaskClient:
    """A worker's client connection: requests from task code, answered by the task manager.

    Any thread may send a request; the ``distexec-client`` thread reads the answers and
    completes the request's future (or calls its handler). Requests fail with
    :class:`ConnectionError` once the connection is gone.
    """

    def __init__(self, worker: Worker) -> None:
        assert worker.address is not None
        host, port = worker.address
        sock = connect(host, port, CLIENT_SETUP_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info = worker_info(worker.worker_id)
        info["channel"] = "client"
        client_handshake(sock, worker.key, info)
        sock.settimeout(None)
        self.sock = sock
        self.worker = worker
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.pending: dict[int, Any] = {}  # request id -> Future, or handler(ok, extra, bufs)
        self.ids = iter(range(1, 1 << 62))
        self.broken: BaseException | None = None
        # Child results are unpickled, and their futures completed (running the callbacks),
        # on a thread of their own: user code there may itself wait for an answer that only
        # the reader thread can deliver.
        self.answers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="distexec-client", daemon=True).start()
        threading.Thread(target=self._complete, name="distexec-client-results",
                         daemon=True).start()

    def request(self, kind: int, meta: tuple[Any, ...], buffers: list[Any] = (),  # type: ignore[assignment]
                handler: Any = None) -> Any:
        """Send a request; return a Future for its answer ``(ok, extra, buffers)`` (or the
        frame, for RUN), or register ``handler`` to be called with the answer instead."""
        from concurrent.futures import Future

        future: Any = Future() if handler is None else None
        with self.lock:
            if self.broken is not None:
                raise ConnectionError(f"the connection to the task manager is gone: "
                                      f"{self.broken}")
            req_id = next(self.ids)
            self.pending[req_id] = future if handler is None else handler
        parts = protocol.encode_frame(kind, (req_id, *meta), buffers)
        with self.send_lock:
            protocol.send_all_blocking(self.sock, parts)
        return future if handler is None else req_id

    def _read(self) -> None:
        decoder = protocol.FrameDecoder()
        try:
            while True:
                n = self.sock.recv_into(decoder.recv_buffer())
                if n == 0:
                    raise ConnectionError("the task manager closed the client connection")
                for frame in decoder.feed(n):
                    if frame.kind == protocol.FORGET:
                        self.worker.forget(frame.meta[0])
                        continue
                    with self.lock:
                        waiter = self.pending.pop(frame.meta[0], None)
                    if waiter is None:
                        continue
                    if frame.kind == protocol.RUN:
                        answer: Any = frame
                    else:
                        _, ok, extra = frame.meta
                        answer = (ok, extra, frame.buffers)
                    if callable(waiter):
                        self.answers.put((waiter, answer))
                    else:
                        waiter.set_result(answer)
        except BaseException as exc:  # the connection is gone: fail whatever waits
            with self.lock:
                self.broken = exc
                waiting, self.pending = self.pending, {}
            message = (f"the connection to the task manager was lost ({exc}), so the answer "
                       "cannot arrive (the executor stopped, or this worker was replaced)")
            for waiter in waiting.values():
                if callable(waiter):
                    self.answers.put((waiter, (False, ("ConnectionError", message, ""), [])))
                else:
                    waiter.set_exception(ConnectionError(message))
            self.answers.put(None)

    def _complete(self) -> None:
        """distexec-client-results thread: hand child tasks' answers to their futures."""
        while True:
            item = self.answers.get()
            if item is None:
                return
            waiter, answer = item
            try:
                waiter(*answer)
            except BaseException:  # a callback's error must not stop the others
                logger.exception("error while completing a child task's future")
