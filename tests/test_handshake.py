"""Bad input on the task manager's port is refused and logged; running work is unaffected."""

from __future__ import annotations

import logging
import os
import socket
import struct

import pytest

from distexec import DistributedExecutor, manager, protocol, worker, worker_client
from distexec.errors import HandshakeError
from helpers import Gate, square, wait_gate

pytestmark = pytest.mark.timeout(60)


def connect(ex):
    host, port = ex.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    hello = worker_client._recv_exactly(sock, protocol.HELLO.size)
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


# Runs in its own process: n junk connections without the key (a third close at once, a third
# send garbage, a third send half a handshake and stall, up to 200 of those held at a time).
JUNK_PEER = r"""
import os, socket, struct, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stall = b"DXEW" + struct.pack("!HH", 1, 2000) + bytes(64)
held = []
for i in range(n):
    s = socket.create_connection((host, port), timeout=10)
    try:
        if i % 3 == 0:
            s.close()
        elif i % 3 == 1:
            s.sendall(os.urandom(300))
            s.close()
        else:
            s.sendall(stall)
            held.append(s)
            if len(held) >= 200:
                for h in held[:100]:
                    h.close()
                del held[:100]
    except OSError:
        s.close()
"""


def run_junk_peer(ex, n):
    import subprocess
    import sys

    host, port = ex.address.rsplit(":", 1)
    subprocess.run([sys.executable, "-c", JUNK_PEER, host, port, str(n)], check=True,
                   timeout=100)


@pytest.mark.timeout(150)
def test_junk_connections_cost_no_memory(busy_executor, caplog):
    """Each connection used to get a 256 KiB buffer at accept, kept 10 s after it closed:
    3,000 of them cost about 770 MiB. Now an unauthenticated connection costs about 1 KiB."""
    import threading

    import psutil

    caplog.set_level(logging.WARNING, logger="distexec")
    me = psutil.Process()
    before = me.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], me.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run_junk_peer(busy_executor, 3000)
        # Work goes on during and after the flood.
        assert list(busy_executor.map(square, range(100))) == [i * i for i in range(100)]
    finally:
        done.set()
        sampler.join()
    growth = (peak[0] - before) / 2**20
    assert growth < 30, f"RSS grew by {growth:.0f} MiB under 3,000 junk connections"
    # The log is not flooded: at most a burst per window, plus a summary line.
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) <= 3 * manager.REFUSAL_LOG_BURST, len(refusals)


def test_pending_handshakes_are_bounded_and_workers_still_join(busy_executor, caplog):
    caplog.set_level(logging.WARNING, logger="distexec")
    limit = manager.MAX_PENDING_HANDSHAKES
    stalled = []
    try:
        for _ in range(limit + 20):
            sock, _ = connect(busy_executor)
            sock.sendall(protocol.MAGIC_AUTH)  # a start, then nothing
            stalled.append(sock)
        # The oldest were dropped to make room; the newest are still waiting.
        for sock in stalled[:20]:
            assert closed_by_peer(sock)
        stalled[-1].settimeout(0.2)
        assert not closed_by_peer(stalled[-1])
        # A real worker still gets in: its handshake completes in one round trip.
        busy_executor.resize(3)
        assert busy_executor.wait_for_workers(3, timeout=30) >= 3
        assert busy_executor.submit(square, 5).result(timeout=30) == 25
    finally:
        for sock in stalled:
            sock.close()
    assert refused(caplog, "dropped the oldest")
