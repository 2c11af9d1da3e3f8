"""Bad input on the task manager's port is refused and logged; running work is unaffected."""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest

from distexec import DistributedExecutor, protocol, worker
from distexec.errors import HandshakeError
from helpers import Gate, square, wait_gate

pytestmark = pytest.mark.timeout(60)


def connect(ex):
    host, port = ex.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hello = worker._recv_exactly(sock, protocol.HELLO.size)
    return sock, protocol.parse_hello(hello)


def closed_by_peer(sock):
    """True once the manager has closed the connection (reads until EOF, bounded by timeout)."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture
def busy_executor():
    """An executor with a task in flight while the attacks happen."""
    gate = Gate()
    ex = DistributedExecutor(max_workers=2)  # one busy, one free to show the manager works
    future = ex.submit(wait_gate, gate.address, "survived")
    gate.wait_arrivals(1)
    yield ex
    gate.open()
    assert future.result(timeout=30) == "survived"
    assert ex.submit(square, 4).result() == 16
    ex.shutdown()
    gate.close()


def refused(caplog, text):
    return any(text in r.getMessage() for r in caplog.records
               if r.name.startswith("distexec") and r.levelno >= logging.WARNING)


ATTACKS = {
    "random bytes": os.urandom(4096),
    "http request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "truncated auth": protocol.MAGIC_AUTH + b"\x00\x01",
    "huge length prefix": protocol.AUTH.pack(protocol.MAGIC_AUTH, protocol.PROTOCOL_VERSION,
                                             65535, b"\0" * 32, b"\0" * 32),
    "old protocol version": protocol.AUTH.pack(protocol.MAGIC_AUTH, 0, 2, b"\0" * 32,
                                               b"\0" * 32) + b"{}",
}
EXPECTED = {
    "random bytes": "not a distexec worker",
    "http request": "not a distexec worker",
    "truncated auth": "closed during the handshake",
    "huge length prefix": "limit",
    "old protocol version": "protocol version 0",
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_garbage_is_refused(busy_executor, caplog, name):
    caplog.set_level(logging.WARNING, logger="distexec")
    sock, _ = connect(busy_executor)
    with sock:
        try:
            sock.sendall(ATTACKS[name])
        except OSError:
            pass
        if name == "truncated auth":
            sock.shutdown(socket.SHUT_WR)
        assert closed_by_peer(sock)
    # The log line may trail the close by a moment: wait for the manager to process more input.
    busy_executor.submit(square, 1).result(timeout=30)
    assert refused(caplog, EXPECTED[name]), [r.getMessage() for r in caplog.records]


def test_wrong_key_is_refused(busy_executor, caplog):
    caplog.set_level(logging.WARNING, logger="distexec")
    host, port = busy_executor.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with pytest.raises(HandshakeError, match="authentication failed"):
            worker.client_handshake(sock, os.urandom(32), worker.worker_info(None))
    busy_executor.submit(square, 1).result(timeout=30)
    assert refused(caplog, "authentication failed")


def test_version_mismatch_names_both_sides(busy_executor, caplog):
    caplog.set_level(logging.WARNING, logger="distexec")
    info = dict(worker.worker_info(None), distexec="0.0.1", python="3.9.1")
    host, port = busy_executor.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        with pytest.raises(HandshakeError) as err:
            worker.client_handshake(sock, busy_executor._manager.key, info)
    message = str(err.value)
    assert "distexec 0.0.1" in message and "Python 3.9" in message
    from distexec import __version__

    assert f"distexec {__version__}" in message
    busy_executor.submit(square, 1).result(timeout=30)
    assert refused(caplog, "version mismatch")


def test_authenticated_garbage_frame_drops_only_that_connection(busy_executor, caplog):
    caplog.set_level(logging.WARNING, logger="distexec")
    host, port = busy_executor.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        worker.client_handshake(sock, busy_executor._manager.key, worker.worker_info(None))
        sock.sendall(struct.pack("!BBHI", 200, 0, 0, 0))  # unknown message kind
        assert closed_by_peer(sock)
    busy_executor.submit(square, 1).result(timeout=30)
    assert refused(caplog, "unknown message kind")
