"""The distexec wire protocol: a handshake, then length-prefixed frames. Bytes in, bytes out.

This module does no I/O of its own: the task manager drives it from a non-blocking selector loop,
the worker from a blocking socket. Everything here can be tested with plain byte strings.

Handshake
=========
Nothing is unpickled before both sides have proved they hold the executor's key. The key is 32
random bytes made per executor unless the user supplies one (at least 16 bytes); every MAC is
HMAC-SHA256 over a label and both nonces, so a recorded exchange cannot be replayed and neither
side can be impersonated by reflecting the other.

====  =========  =========================================================================
step  direction  bytes (network byte order)
====  =========  =========================================================================
1     M -> W     HELLO   ``"DXEC"`` u16 version, u16 flags (0), 32-byte nonce_m        (40 B)
2     W -> M     AUTH    ``"DXEW"`` u16 version, u16 info_len, 32-byte mac_w, 32-byte nonce_w,
                         then ``info_len`` bytes of UTF-8 JSON describing the worker
3     M -> W     WELCOME ``"DXEM"`` u8 status, u8 0, u16 msg_len, 32-byte mac_m, then
                         ``msg_len`` bytes of UTF-8 JSON (worker id, or why it was refused)
====  =========  =========================================================================

with ``mac_w = HMAC(key, "distexec-worker" + nonce_m + nonce_w + info)`` and
``mac_m = HMAC(key, "distexec-manager" + nonce_w + nonce_m + status byte + msg)``.

The manager checks the protocol version and the magic before reading further, and the worker's
info (Python minor version, cloudpickle and distexec versions) only after ``mac_w`` verified.
A refusal (status != 0) carries a readable reason; when the worker's MAC was wrong the refusal
cannot be authenticated, and the worker reports it as such.

Frames
======
After the handshake every message is one frame::

    offset  size        field
    0       u8          kind (one of the message kinds below)
    1       u8          flags (0; reserved)
    2       u16         nbufs: number of out-of-band buffers
    4       u32         meta_len: length of the meta section
    8       8 * nbufs   u64 length of each buffer
    ...     meta_len    meta: a pickle (protocol 5) of a tuple of plain data
    ...                 the buffers, back to back

A frame whose total size exceeds the receiver's limit, or with more than ``MAX_BUFFERS``
buffers, or of an unknown kind, is a protocol error and the connection is dropped. Buffers carry
pickle protocol 5 out-of-band data (NumPy arrays, large payloads) so that they are written from
and read into their final memory without intermediate copies.

Message kinds
=============
======  ===============  ===========  ====================================================
code    name             direction    meta
======  ===============  ===========  ====================================================
1       CONFIG           M -> W       (config dict,)   worker id, sys.path, initializer
2       TASKS            M -> W       (definitions, forget, items); see manager/worker
3       SHUTDOWN         M -> W       (reason,)   finish what you hold, then exit; reason
                                      is "" or "replaced" (declared lost, then came back)
4       STATUS           M -> C       (status dict,)   answer to a status connection, then
                                      the manager closes it (see below)
5       REPLY            M -> C       (request id, ok, extra)   answer to FETCH, SUBMIT or CLAIM;
                                      buffers: the pickled value or exception
6       RUN              M -> C       (claim id, definitions, items)   run this child task here
                                      now (answer to CLAIM); items as in TASKS
7       FORGET           M -> W       (names,)   shared data replaced or deleted: drop copies
16      READY            W -> M       (pid,)   initializer done, send tasks
17      INIT_FAILED      W -> M       (error item,)   initializer raised; worker exits
18      RESULTS          W -> M       (items,)  one item per finished task
19      LEAVE            W -> M       ()   take no new task; SHUTDOWN me when I hold none
20      SUBMIT           C -> M       (request id, pickled function, nbufs, options)   a task
                                      submits a child task; buffers: its pickled arguments
21      CLAIM            C -> M       (claim id, request id)   the parent waits for this child:
                                      send it here (RUN) if it is still queued
22      FETCH            C -> M       (request id, name)   read shared data
======  ===============  ===========  ====================================================

Control channel
===============
Each worker opens a second connection, authenticated by the same handshake with
``"channel": "control"`` in its info. It carries no frames:

* worker to manager: heartbeats, one NUL byte (``BEAT``) per heartbeat interval, from two
  sources: the worker's control thread, and its *pulse* process, a tiny child interpreter that
  needs no GIL of the worker's, so a worker whose task holds the GIL inside a C call keeps
  beating, while a frozen (stopped) or unreachable worker falls silent. The manager treats any
  byte as a sign of life. Also the answers to ``ABORT`` and ``DUMP`` (below).
* manager to worker: fixed-size commands, ``CONTROL_COMMAND`` = u8 command, i64 task id,
  i64 attempt. ``ABORT``: if that attempt is running, the worker stops it by exiting (or, when
  it was started by hand, by restarting itself); if it is still queued there, it is skipped.
  ``PING``: sent every heartbeat interval. A worker that hears nothing from the manager for
  ``manager_timeout`` seconds (given in the welcome) exits: through an SSH tunnel, a
  partitioned network is invisible to its sockets.
  The worker answers an ``ABORT`` of a task it had not started with ``ACK_MARK`` followed by
  ``CONTROL_COMMAND(SKIPPED, task id, attempt)`` in its control stream.
  ``DUMP``: write a stack dump now, between ``DUMP_BEGIN`` and ``DUMP_END`` lines (the
  manager asks for one before stopping a task that ran past its time limit, to say where it
  was; while the task holds the GIL the answer waits, and the manager does not wait long).

When the control connection closes, the worker exits at once: its task manager is gone.

Client connections
==================
A task that reads shared data or submits tasks of its own makes its worker open a third
connection, authenticated with ``"channel": "client"`` (and the worker's id and pid). It carries
frames: SUBMIT, CLAIM and FETCH from the worker, REPLY and RUN from the manager. A reply may
come long after its request (the result of a child task), so a reader thread in the worker
matches replies to requests by id. FORGET travels on the main connection, ahead of any task
submitted after the data changed, so such a task never reads a stale copy.

Status connections
==================
``distexec status`` authenticates with the same handshake and ``"channel": "status"`` in its
info; the manager answers with one ``STATUS`` frame of plain data (strings and numbers only, so
the client unpickles nothing it did not expect) and closes the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import pickle
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from .errors import HandshakeError, ProtocolError

PROTOCOL_VERSION = 2  # 2: buffer lengths carry READONLY_BIT and BYTEARRAY_BIT

# ---------------------------------------------------------------------------- handshake
KEY_SIZE = 32
NONCE_SIZE = 32
MAC_SIZE = 32
MAGIC_HELLO = b"DXEC"
MAGIC_AUTH = b"DXEW"
MAGIC_WELCOME = b"DXEM"
HELLO = struct.Struct("!4sHH32s")
AUTH = struct.Struct("!4sHH32s32s")
WELCOME = struct.Struct("!4sBBH32s")
# The JSON blobs in the handshake are tiny; anything bigger is garbage or an attack.
MAX_HANDSHAKE_JSON = 16 * 1024

STATUS_OK = 0
STATUS_BAD_KEY = 1
STATUS_VERSION_MISMATCH = 2
STATUS_REFUSED = 3

_LABEL_WORKER = b"distexec-worker"
_LABEL_MANAGER = b"distexec-manager"


def set_keepalive(sock: Any, idle: int = 30) -> None:
    """Let the kernel notice a peer host that vanished (no GIL needed, no traffic when idle)."""
    import socket

    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:
        pass


def new_key() -> bytes:
    """Return a fresh random executor key."""
    return os.urandom(KEY_SIZE)


# Shortest key accepted (bytes): 128 bits.
MIN_KEY_BYTES = 16


def parse_key(key: bytes | bytearray | str, what: str = "key") -> bytes:
    """An executor key given as bytes or as hexadecimal text (a key file, ``DISTEXEC_KEY``, a
    worker's stdin): the one rule for the executor and the worker (ValueError/TypeError saying
    what is wrong)."""
    if isinstance(key, str):
        try:
            raw = bytes.fromhex(key.strip())
        except ValueError:
            raise ValueError(f"{what} must be bytes, or a hexadecimal string") from None
    elif isinstance(key, (bytes, bytearray)):
        raw = bytes(key)
    else:
        raise TypeError(f"{what} must be bytes, a hexadecimal string or None")
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"{what} is too short ({len(raw)} bytes): use at least {MIN_KEY_BYTES} "
                         "random bytes, e.g. from 'distexec keygen FILE'")
    return raw


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def make_hello(nonce_m: bytes) -> bytes:
    """Step 1, manager side."""
    return HELLO.pack(MAGIC_HELLO, PROTOCOL_VERSION, 0, nonce_m)


def parse_hello(data: bytes) -> bytes:
    """Step 1, worker side: check the manager's greeting and return its nonce."""
    magic, version, _flags, nonce_m = HELLO.unpack(data)
    if magic != MAGIC_HELLO:
        raise HandshakeError(
            f"the peer is not a distexec task manager (greeting {data[:4]!r}); "
            "check the address and port"
        )
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"the task manager speaks distexec protocol version {version}, this worker speaks "
            f"{PROTOCOL_VERSION}; install the same distexec version on both sides"
        )
    return bytes(nonce_m)


def make_auth(key: bytes, nonce_m: bytes, nonce_w: bytes, info: dict[str, Any]) -> bytes:
    """Step 2, worker side: prove we hold the key and describe ourselves."""
    blob = json.dumps(info, separators=(",", ":"), sort_keys=True).encode()
    if len(blob) > MAX_HANDSHAKE_JSON:
        raise ValueError("worker info too large for the handshake")
    mac = _mac(key, _LABEL_WORKER, nonce_m, nonce_w, blob)
    return AUTH.pack(MAGIC_AUTH, PROTOCOL_VERSION, len(blob), mac, nonce_w) + blob


class AuthHeader(NamedTuple):
    info_len: int
    mac: bytes
    nonce_w: bytes


def parse_auth_header(data: bytes) -> AuthHeader:
    """Step 2, manager side: validate the fixed part before reading the JSON."""
    magic, version, info_len, mac, nonce_w = AUTH.unpack(data)
    if magic != MAGIC_AUTH:
        raise ProtocolError(f"not a distexec worker: it sent {bytes(data[:8])!r}")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(
            f"the worker speaks distexec protocol version {version}, this task manager speaks "
            f"{PROTOCOL_VERSION}"
        )
    if info_len > MAX_HANDSHAKE_JSON:
        raise ProtocolError(f"handshake claims {info_len} bytes of worker info, limit is "
                            f"{MAX_HANDSHAKE_JSON}")
    return AuthHeader(info_len, bytes(mac), bytes(nonce_w))


def verify_auth(key: bytes, nonce_m: bytes, header: AuthHeader, blob: bytes) -> dict[str, Any]:
    """Step 2, manager side: check the worker's MAC, then (only then) decode its info."""
    expected = _mac(key, _LABEL_WORKER, nonce_m, header.nonce_w, blob)
    if not hmac.compare_digest(expected, header.mac):
        raise HandshakeError("authentication failed: the worker does not hold this executor's key")
    try:
        info = json.loads(blob)
    except ValueError as exc:
        raise ProtocolError(f"worker info is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ProtocolError("worker info is not a JSON object")
    return info


def make_welcome(
    key: bytes, nonce_m: bytes, nonce_w: bytes, status: int, message: dict[str, Any]
) -> bytes:
    """Step 3, manager side: accept (status 0) or refuse, authenticated with the key."""
    blob = json.dumps(message, separators=(",", ":"), sort_keys=True).encode()[:MAX_HANDSHAKE_JSON]
    mac = _mac(key, _LABEL_MANAGER, nonce_w, nonce_m, bytes([status]), blob)
    return WELCOME.pack(MAGIC_WELCOME, status, 0, len(blob), mac) + blob


class WelcomeHeader(NamedTuple):
    status: int
    msg_len: int
    mac: bytes


def parse_welcome_header(data: bytes) -> WelcomeHeader:
    """Step 3, worker side: validate the fixed part."""
    magic, status, _reserved, msg_len, mac = WELCOME.unpack(data)
    if magic != MAGIC_WELCOME:
        raise HandshakeError(f"the task manager answered with garbage ({bytes(data[:8])!r})")
    if msg_len > MAX_HANDSHAKE_JSON:
        raise HandshakeError("the task manager's answer is too long")
    return WelcomeHeader(status, msg_len, bytes(mac))


def verify_welcome(
    key: bytes, nonce_m: bytes, nonce_w: bytes, header: WelcomeHeader, blob: bytes
) -> dict[str, Any]:
    """Step 3, worker side: return the manager's message if its MAC is right.

    Raises:
        HandshakeError: the manager refused us (with its reason) or could not prove it holds
            the key.
    """
    expected = _mac(key, _LABEL_MANAGER, nonce_w, nonce_m, bytes([header.status]), blob)
    authentic = hmac.compare_digest(expected, header.mac)
    try:
        message = json.loads(blob) if blob else {}
    except ValueError:
        message = {}
    reason = message.get("error", "") if isinstance(message, dict) else ""
    if header.status != STATUS_OK:
        if authentic:
            raise HandshakeError(f"the task manager refused this worker: {reason}")
        raise HandshakeError(
            f"the task manager refused this worker (unauthenticated reply): {reason or 'no reason'}"
        )
    if not authentic:
        raise HandshakeError(
            "the task manager could not prove it holds the key: wrong key or not the "
            "executor you meant"
        )
    if not isinstance(message, dict):
        raise HandshakeError("the task manager's welcome is not a JSON object")
    return message


# ---------------------------------------------------------------------------- frames
FRAME_HEADER = struct.Struct("!BBHI")
MAX_BUFFERS = 4096
# Default cap on one message's payload: a task's function and arguments, a result, shared data.
# Senders check it before sending (MessageTooLargeError); a receiver refuses a frame that claims
# more than the cap plus FRAME_OVERHEAD, which only a corrupted stream or a broken peer sends.
# Only authenticated peers get this far: before the handshake a connection may send at most
# AUTH.size + MAX_HANDSHAKE_JSON bytes.
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024**3
# Room for a frame's bookkeeping around its payload (task ids, option tuples, small inline items).
FRAME_OVERHEAD = 1024 * 1024

CONFIG = 1
TASKS = 2
SHUTDOWN = 3
STATUS = 4
REPLY = 5
RUN = 6
FORGET = 7
READY = 16
INIT_FAILED = 17
RESULTS = 18
LEAVE = 19
SUBMIT = 20
CLAIM = 21
FETCH = 22
KIND_NAMES = {
    CONFIG: "CONFIG",
    TASKS: "TASKS",
    SHUTDOWN: "SHUTDOWN",
    STATUS: "STATUS",
    REPLY: "REPLY",
    RUN: "RUN",
    FORGET: "FORGET",
    READY: "READY",
    INIT_FAILED: "INIT_FAILED",
    RESULTS: "RESULTS",
    LEAVE: "LEAVE",
    SUBMIT: "SUBMIT",
    CLAIM: "CLAIM",
    FETCH: "FETCH",
}

# ---------------------------------------------------------------------------- control channel
CONTROL_COMMAND = struct.Struct("!Bqq")
PING = 0
ABORT = 1
DUMP = 2
# Worker to manager, inside the control stream: ACK_MARK + CONTROL_COMMAND(SKIPPED, task, attempt)
# says an aborted task was only queued there and was skipped (the worker lives on). The mark
# byte never occurs in the worker's stack dumps (ASCII text, control bytes replaced).
SKIPPED = 3
ACK_MARK = b"\x01"
DUMP_BEGIN = b"Timeout (requested)!\n"
DUMP_END = b"End of requested dump.\n"
# A heartbeat (never part of a stack dump).
BEAT = b"\0"

Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------------------- items
# The items that TASKS, RUN and RESULTS frames carry, each defined once here with a
# mirror-image pair: ``*_item`` builds one (adding its buffers to the frame's list) and
# ``read_*_items`` takes a frame's items and buffers apart again. Items are plain tuples (the
# hot path makes one per task), so these functions are their only definition.

# A payload (a task's pickled function arguments, a pickled result) larger than this travels as
# the first of its item's frame buffers instead of inside the meta pickle (saves a copy).
INLINE_LIMIT = 32 * 1024

# The status of a RESULTS item.
RESULT_RAISED = 0  # ``extra`` is (type name, message, formatted traceback)
RESULT_OK = 1
RESULT_DECLINED = 2  # the task raised TaskDeclined; ``extra`` is its message

# Where a local worker shows which task it runs, in memory shared with its task manager:
# (task id, attempt), zeros between tasks.
PROGRESS = struct.Struct("=qq")

# The environment variable that holds the key for workers started by hand.
KEY_ENV = "DISTEXEC_KEY"


def _add_payload(payload: Buffer, oob: Sequence[Buffer],
                 buffers: list[Buffer]) -> tuple[Buffer | None, int]:
    if len(payload) > INLINE_LIMIT:
        buffers.append(payload)
        buffers.extend(oob)
        return None, len(oob) + 1
    buffers.extend(oob)
    return payload, len(oob)


def _take_payload(inline: Any, nbufs: int, buffers: list[Buffer],
                  cursor: int) -> tuple[Any, list[Buffer], int]:
    if inline is None:
        payload = buffers[cursor]
        cursor += 1
        nbufs -= 1
    else:
        payload = inline
    return payload, buffers[cursor:cursor + nbufs], cursor + nbufs


def task_item(task_id: int, attempt: int, fn_id: int, kind: int, payload: Buffer,
              oob: Sequence[Buffer], buffers: list[Buffer]) -> tuple[Any, ...]:
    """One task of a TASKS or RUN frame: its pickled arguments ``payload`` with their
    out-of-band buffers ``oob`` (added to the frame's ``buffers``)."""
    inline, nbufs = _add_payload(payload, oob, buffers)
    return (task_id, attempt, fn_id, kind, inline, nbufs)


def read_task_items(items: Sequence[tuple[Any, ...]], buffers: list[Buffer]
                    ) -> Iterator[tuple[int, int, int, int, Any, list[Buffer]]]:
    """Inverse of :func:`task_item`: (task id, attempt, fn id, kind, payload, oob) each."""
    cursor = 0
    for task_id, attempt, fn_id, kind, inline, nbufs in items:
        payload, oob, cursor = _take_payload(inline, nbufs, buffers, cursor)
        yield task_id, attempt, fn_id, kind, payload, oob


def result_item(task_id: int, attempt: int, status: int, payload: Buffer,
                oob: Sequence[Buffer], duration: float, extra: Any,
                buffers: list[Buffer]) -> tuple[Any, ...]:
    """One finished task of a RESULTS frame: ``status`` (RESULT_OK with the pickled result,
    RESULT_RAISED with the pickled exception, RESULT_DECLINED), the payload and its
    out-of-band buffers (added to the frame's ``buffers``), the task's run time, ``extra``."""
    inline, nbufs = _add_payload(payload, oob, buffers)
    return (task_id, attempt, status, inline, nbufs, duration, extra)


def read_result_items(items: Sequence[tuple[Any, ...]], buffers: list[Buffer]
                      ) -> Iterator[tuple[int, int, int, Any, list[Buffer], float, Any]]:
    """Inverse of :func:`result_item`: (task id, attempt, status, payload, oob, duration,
    extra) each."""
    cursor = 0
    for task_id, attempt, status, inline, nbufs, duration, extra in items:
        payload, oob, cursor = _take_payload(inline, nbufs, buffers, cursor)
        yield task_id, attempt, status, payload, oob, duration, extra


class Frame(NamedTuple):
    kind: int
    meta: Any  # the unpickled meta tuple
    buffers: list[Buffer]


# The top bits of a buffer's length in a frame header say what memory the receiver should read
# it into (see FrameDecoder), so that it need not be copied to become what it was: a buffer
# that was read-only where it was sent (a ``bytes`` object, a read-only array) becomes ``bytes``,
# one that was a ``bytearray`` a ``bytearray``, any other (an array's memory) fresh anonymous
# memory, which costs nothing until it is written.
READONLY_BIT = 1 << 63
BYTEARRAY_BIT = 1 << 62
_LENGTH_MASK = BYTEARRAY_BIT - 1


def _wire_length(view: Buffer) -> int:
    if type(view) is bytes:
        return len(view) | READONLY_BIT
    assert isinstance(view, memoryview)
    if view.readonly:
        return view.nbytes | READONLY_BIT
    if type(view.obj) is bytearray:
        return view.nbytes | BYTEARRAY_BIT
    return view.nbytes


def encode_frame(kind: int, meta: Any, buffers: Sequence[Buffer] = ()) -> list[Buffer]:
    """Return the pieces of one frame, ready for ``socket.sendmsg`` (no concatenation)."""
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(f"a frame carries at most {MAX_BUFFERS} buffers")
    blob = pickle.dumps(meta, protocol=5)
    views = [memoryview(b).cast("B") if not isinstance(b, bytes) else b for b in buffers]
    head = FRAME_HEADER.pack(kind, 0, len(views), len(blob))
    if views:
        head += struct.pack(f"!{len(views)}Q", *(_wire_length(v) for v in views))
    if len(blob) < 16384:
        return [head + blob, *views]
    return [head, blob, *views]


# Frames whose body fits below this are assembled in the decoder's scratch buffer; bigger ones
# get buffers of their own that the socket reads straight into (one copy, from the kernel).
_DIRECT_THRESHOLD = 64 * 1024
# The scratch buffer starts small (an idle connection, such as most of a large fleet's, costs
# little) and doubles, up to the larger size, when a read fills it or a frame needs more: a busy
# connection then reads many frames per system call.
_SCRATCH_START = 16 * 1024
_SCRATCH_SIZE = 256 * 1024


def _bytes_allocator() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """A function ``n -> (bytes object, writable view of its n bytes)``, or None.

    The C API documents that a ``bytes`` object made by ``PyBytes_FromStringAndSize(NULL, n)``
    is uninitialised and may be filled before anyone else sees it; that lets a socket read a
    large read-only buffer straight into its final object (no zero fill, no copy afterwards).
    Our own handle on the C API (not ``ctypes.pythonapi``, whose function prototypes other code
    may set). Without ctypes, large read-only buffers are received into a bytearray and copied.
    """
    try:
        import ctypes

        api = ctypes.PyDLL(None)
        new = api.PyBytes_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        address = api.PyBytes_AsString
        address.restype = ctypes.c_void_p
        address.argtypes = (ctypes.py_object,)
        char = ctypes.c_char
    except Exception:  # no ctypes, or not CPython
        return None

    def allocate(n: int) -> tuple[bytes, memoryview]:
        obj = new(None, n)
        window = (char * n).from_address(address(obj))
        # A view of the window then keeps the bytes object, whose memory it is, alive.
        window.owner = obj  # type: ignore[attr-defined]
        return obj, memoryview(window).cast("B")

    return allocate


# Made on first use (importing ctypes costs every process 1-2 ms); False: not made yet.
_new_bytes: Callable[[int], tuple[bytes, memoryview]] | None | bool = False


# Writable buffers at least this large (an array's memory) are received into a private
# anonymous mapping of their own: zero pages the kernel provides as they are written, where a
# bytearray is first zeroed byte by byte (about 10 % faster for 64 MiB here). Smaller ones use a
# bytearray: every mapping counts against the process's limit (vm.max_map_count).
_MAP_THRESHOLD = 1024 * 1024
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)


def _segment(length: int) -> tuple[Any, memoryview]:
    """Memory for one buffer of a large frame: (what the frame hands out, where to receive).
    The meta section is always read-only (see encode_frame). Raises MemoryError."""
    size = length & _LENGTH_MASK
    if length & READONLY_BIT:
        global _new_bytes
        if _new_bytes is False:
            _new_bytes = _bytes_allocator()
        if callable(_new_bytes) and size:
            return _new_bytes(size)
    elif not length & BYTEARRAY_BIT and size >= _MAP_THRESHOLD and _MAP_FLAGS:
        try:
            anon = mmap.mmap(-1, size, flags=_MAP_FLAGS)
        except OSError as exc:  # ENOMEM: out of memory or of mappings
            raise MemoryError(f"cannot map {size} bytes: {exc}") from exc
        return anon, memoryview(anon)
    target = bytearray(size)
    return target, memoryview(target)


class FrameDecoder:
    """Incremental frame parser that hands out the memory to ``recv_into`` next.

    Usage (any thread, one decoder per connection)::

        n = sock.recv_into(decoder.recv_buffer())
        for frame in decoder.feed(n): ...

    Raises :class:`ProtocolError` on an unknown kind, too many buffers or an oversized frame.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._scratch = bytearray(_SCRATCH_START)
        self._start = 0
        self._end = 0
        # A large frame in progress: its kind, the buffers it will hand out (meta first) and the
        # writable views of them that the socket fills.
        self._big: tuple[int, list[Buffer], list[memoryview]] | None = None
        self._seg = 0
        self._off = 0

    def recv_buffer(self) -> memoryview:
        if self._big is not None:
            return self._big[2][self._seg][self._off:]
        if self._end == len(self._scratch):
            self._compact()
        return memoryview(self._scratch)[self._end:]

    def _compact(self, need: int = 0) -> None:
        """Move what is buffered to the start; make room for ``need`` bytes in all."""
        n = self._end - self._start
        size = len(self._scratch)
        if need > size or (need < 0 and size < _SCRATCH_SIZE):
            # Grow: to what a frame needs, or (need < 0: a read filled it) twice the size.
            grown = bytearray(max(need, min(2 * size, _SCRATCH_SIZE)))
            grown[:n] = self._scratch[self._start:self._end]
            self._scratch = grown
        elif n and self._start:
            self._scratch[:n] = self._scratch[self._start:self._end]
        self._start, self._end = 0, n

    def feed(self, n: int) -> list[Frame]:
        frames: list[Frame] = []
        if self._big is not None:
            self._off += n
            self._advance_big(frames)
            if self._big is not None:
                return frames
        else:
            filled = self._end + n == len(self._scratch)
            self._end += n
            if filled and len(self._scratch) < _SCRATCH_SIZE:
                self._parse(frames)
                self._compact(-1)  # busy: read more per call from now on
                return frames
        self._parse(frames)
        return frames

    def _advance_big(self, frames: list[Frame]) -> None:
        assert self._big is not None
        kind, objs, targets = self._big
        while self._seg < len(targets) and self._off >= targets[self._seg].nbytes:
            self._seg += 1
            self._off = 0
        if self._seg == len(targets):
            self._big = None
            frames.append(_make_frame(kind, objs[0], objs[1:]))

    def _parse(self, frames: list[Frame]) -> None:
        buf = self._scratch
        while True:
            avail = self._end - self._start
            if avail < FRAME_HEADER.size:
                break
            kind, _flags, nbufs, meta_len = FRAME_HEADER.unpack_from(buf, self._start)
            if kind not in KIND_NAMES:
                raise ProtocolError(f"unknown message kind {kind}")
            if nbufs > MAX_BUFFERS:
                raise ProtocolError(f"frame declares {nbufs} buffers, limit is {MAX_BUFFERS}")
            head_len = FRAME_HEADER.size + 8 * nbufs
            if avail < head_len:
                if self._start + head_len > len(buf):
                    self._compact(head_len)
                break
            lens = struct.unpack_from(f"!{nbufs}Q", buf, self._start + FRAME_HEADER.size)
            body = meta_len + sum(length & _LENGTH_MASK for length in lens)
            if body > self.max_message_size:
                raise ProtocolError(
                    f"frame of {body} bytes exceeds the limit of {self.max_message_size} bytes"
                )
            if body <= _DIRECT_THRESHOLD:
                if avail < head_len + body:
                    if self._start + head_len + body > len(buf):
                        self._compact(head_len + body)
                    break
                pos = self._start + head_len
                view = memoryview(buf)
                meta = bytes(view[pos:pos + meta_len])
                pos += meta_len
                bufs: list[Buffer] = []
                for length in lens:
                    size = length & _LENGTH_MASK
                    if length & READONLY_BIT:
                        bufs.append(bytes(view[pos:pos + size]))
                    else:
                        bufs.append(bytearray(view[pos:pos + size]))
                    pos += size
                self._start = pos
                frames.append(_make_frame(kind, meta, bufs))
                continue
            # Large frame: give each section its own memory and move what we already have.
            objs: list[Buffer] = []
            targets: list[memoryview] = []
            for obj, target in map(_segment, (meta_len | READONLY_BIT, *lens)):
                objs.append(obj)
                targets.append(target)
            self._start += head_len
            self._seg, self._off = 0, 0
            self._big = (kind, objs, targets)
            self._advance_big(frames)
            view = memoryview(buf)
            while self._big is not None and self._start < self._end:
                seg = targets[self._seg]
                take = min(self._end - self._start, seg.nbytes - self._off)
                seg[self._off:self._off + take] = view[self._start:self._start + take]
                self._start += take
                self._off += take
                self._advance_big(frames)
            if self._big is None:
                continue  # complete already; parse what follows it
            self._start = self._end = 0
            break
        if self._start == self._end:
            self._start = self._end = 0


def _make_frame(kind: int, meta: Buffer, buffers: list[Buffer]) -> Frame:
    try:
        obj = pickle.loads(meta)
    except Exception as exc:
        raise ProtocolError(f"{KIND_NAMES[kind]} frame has an undecodable meta section: "
                            f"{exc!r}") from exc
    if not isinstance(obj, tuple):
        raise ProtocolError(f"{KIND_NAMES[kind]} frame meta is not a tuple")
    return Frame(kind, obj, buffers)


class OutQueue:
    """Bytes waiting to be written to one non-blocking socket (manager thread only)."""

    # sendmsg takes at most IOV_MAX (1024 on Linux) pieces; stay well below.
    _IOV_BATCH = 64

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()

    def __bool__(self) -> bool:
        return bool(self._parts)

    def extend(self, parts: Sequence[Buffer]) -> None:
        for p in parts:
            mv = p if isinstance(p, memoryview) else memoryview(p)
            if mv.nbytes:
                self._parts.append(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv)

    def write_to(self, sock: Any) -> int:
        """Write as much as the socket takes; return bytes written. Raises OSError on failure."""
        total = 0
        parts = self._parts
        while parts:
            batch = [parts[i] for i in range(min(len(parts), self._IOV_BATCH))]
            want = sum(v.nbytes for v in batch)
            try:
                sent = sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            total += sent
            left = sent
            while left:
                head = parts[0]
                if left >= head.nbytes:
                    left -= head.nbytes
                    parts.popleft()
                else:
                    parts[0] = head[left:]
                    left = 0
            if sent < want:
                break
        return total


def send_all_blocking(sock: Any, parts: Sequence[Buffer]) -> None:
    """Write every piece to a blocking socket with scatter-gather, no concatenation."""
    views = deque(memoryview(p).cast("B") if not isinstance(p, bytes) else memoryview(p)
                  for p in parts)
    while views:
        batch = [views[i] for i in range(min(len(views), 64))]
        sent = sock.sendmsg(batch)
        while sent:
            head = views[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                views.popleft()
            else:
                views[0] = head[sent:]
                sent = 0
        while views and views[0].nbytes == 0:
            views.popleft()
