"""The wire format as pure bytes: frames and handshake messages."""

from __future__ import annotations

import random
import struct

import pytest

from distexec import protocol
from distexec.errors import HandshakeError, ProtocolError

pytestmark = pytest.mark.timeout(60)


def stream_of(frames):
    return b"".join(b"".join(bytes(p) for p in protocol.encode_frame(protocol.TASKS, m, b))
                    for m, b in frames)


def decode_in_pieces(stream, rng, max_size=protocol.DEFAULT_MAX_MESSAGE_SIZE):
    decoder = protocol.FrameDecoder(max_size)
    out, pos = [], 0
    while pos < len(stream):
        view = decoder.recv_buffer()
        n = min(len(view), rng.choice([1, 7, 1000, 65536, 10**6]), len(stream) - pos)
        view[:n] = stream[pos:pos + n]
        pos += n
        out += decoder.feed(n)
    return decoder, out


@pytest.mark.parametrize("seed", range(40))
def test_frames_survive_any_split(seed):
    rng = random.Random(seed)
    frames = []
    for i in range(rng.randint(1, 6)):
        meta = ("x" * rng.choice([0, 10, 70000, 300000]), i)
        bufs = [rng.randbytes(rng.choice([0, 5, 70000, 100000])) for _ in range(rng.randint(0, 3))]
        frames.append((meta, bufs))
    decoder, out = decode_in_pieces(stream_of(frames), rng)
    assert [(f.meta, [bytes(b) for b in f.buffers]) for f in out] == frames
    # Nothing half-read is left behind: one more frame comes out exactly as it went in.
    tail = b"".join(bytes(p) for p in protocol.encode_frame(protocol.RESULTS, ("end",), [b"z"]))
    view = decoder.recv_buffer()
    view[:len(tail)] = tail
    (last,) = decoder.feed(len(tail))
    assert last.meta == ("end",) and [bytes(b) for b in last.buffers] == [b"z"]


def test_oversized_frame_is_refused_before_allocation():
    head = protocol.FRAME_HEADER.pack(protocol.RESULTS, 0, 1, 10) + struct.pack("!Q", 2**60)
    decoder = protocol.FrameDecoder(1024)
    view = decoder.recv_buffer()
    view[:len(head)] = head
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(len(head))


def test_unknown_kind_and_too_many_buffers():
    for head, match in [
        (protocol.FRAME_HEADER.pack(99, 0, 0, 1), "unknown message kind"),
        (protocol.FRAME_HEADER.pack(protocol.TASKS, 0, protocol.MAX_BUFFERS + 1, 1), "buffers"),
    ]:
        decoder = protocol.FrameDecoder()
        decoder.recv_buffer()[:len(head)] = head
        with pytest.raises(ProtocolError, match=match):
            decoder.feed(len(head))


def test_meta_must_unpickle_to_a_tuple():
    blob = b"not a pickle"
    head = protocol.FRAME_HEADER.pack(protocol.TASKS, 0, 0, len(blob)) + blob
    decoder = protocol.FrameDecoder()
    decoder.recv_buffer()[:len(head)] = head
    with pytest.raises(ProtocolError, match="undecodable"):
        decoder.feed(len(head))


def test_handshake_round_trip():
    key = protocol.new_key()
    nonce_m, nonce_w = protocol.new_nonce(), protocol.new_nonce()
    assert protocol.parse_hello(protocol.make_hello(nonce_m)) == nonce_m
    auth = protocol.make_auth(key, nonce_m, nonce_w, {"pid": 1})
    header = protocol.parse_auth_header(auth[:protocol.AUTH.size])
    assert protocol.verify_auth(key, nonce_m, header, auth[protocol.AUTH.size:]) == {"pid": 1}
    welcome = protocol.make_welcome(key, nonce_m, header.nonce_w, protocol.STATUS_OK, {"worker_id": 4})
    wh = protocol.parse_welcome_header(welcome[:protocol.WELCOME.size])
    assert protocol.verify_welcome(key, nonce_m, nonce_w, wh, welcome[protocol.WELCOME.size:]) == {"worker_id": 4}


def test_wrong_key_is_detected_both_ways():
    key, other = protocol.new_key(), protocol.new_key()
    nonce_m, nonce_w = protocol.new_nonce(), protocol.new_nonce()
    auth = protocol.make_auth(other, nonce_m, nonce_w, {})
    header = protocol.parse_auth_header(auth[:protocol.AUTH.size])
    with pytest.raises(HandshakeError, match="authentication failed"):
        protocol.verify_auth(key, nonce_m, header, auth[protocol.AUTH.size:])
    welcome = protocol.make_welcome(other, nonce_m, nonce_w, protocol.STATUS_OK, {})
    wh = protocol.parse_welcome_header(welcome[:protocol.WELCOME.size])
    with pytest.raises(HandshakeError, match="could not prove"):
        protocol.verify_welcome(key, nonce_m, nonce_w, wh, welcome[protocol.WELCOME.size:])


def test_replayed_auth_fails_with_a_new_challenge():
    key = protocol.new_key()
    auth = protocol.make_auth(key, protocol.new_nonce(), protocol.new_nonce(), {})
    header = protocol.parse_auth_header(auth[:protocol.AUTH.size])
    with pytest.raises(HandshakeError):
        protocol.verify_auth(key, protocol.new_nonce(), header, auth[protocol.AUTH.size:])


def test_hello_from_another_program_or_version():
    with pytest.raises(HandshakeError, match="not a distexec task manager"):
        protocol.parse_hello(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\0" * 12)
    old = protocol.HELLO.pack(protocol.MAGIC_HELLO, protocol.PROTOCOL_VERSION + 1, 0, b"\0" * 32)
    with pytest.raises(HandshakeError, match="protocol version"):
        protocol.parse_hello(old)


def test_refusal_carries_the_reason():
    key = protocol.new_key()
    nonce_m, nonce_w = protocol.new_nonce(), protocol.new_nonce()
    welcome = protocol.make_welcome(key, nonce_m, nonce_w, protocol.STATUS_VERSION_MISMATCH,
                                    {"error": "Python 3.10 there vs 3.11 here"})
    wh = protocol.parse_welcome_header(welcome[:protocol.WELCOME.size])
    with pytest.raises(HandshakeError, match="3.10 there vs 3.11 here"):
        protocol.verify_welcome(key, nonce_m, nonce_w, wh, welcome[protocol.WELCOME.size:])


def test_task_items_read_back_as_they_were_made():
    big = b"p" * (protocol.INLINE_LIMIT + 1)
    buffers: list = []
    items = [protocol.task_item(1, 0, 7, 0, b"small", [b"o1"], buffers),
             protocol.task_item(2, 3, 8, 1, big, [b"o2", b"o3"], buffers),
             protocol.task_item(3, 1, 9, 0, b"", [], buffers)]
    assert list(protocol.read_task_items(items, buffers)) == [
        (1, 0, 7, 0, b"small", [b"o1"]), (2, 3, 8, 1, big, [b"o2", b"o3"]), (3, 1, 9, 0, b"", [])]
    assert buffers[1] is big, "a large payload travels as a buffer, not in the meta pickle"


def test_result_items_read_back_as_they_were_made():
    big = b"r" * (protocol.INLINE_LIMIT + 1)
    buffers: list = []
    items = [protocol.result_item(1, 0, protocol.RESULT_OK, big, [b"x"], 0.5, None, buffers),
             protocol.result_item(2, 0, protocol.RESULT_RAISED, b"exc", [], 0.1,
                                  ("ValueError", "m", "tb"), buffers),
             protocol.result_item(3, 2, protocol.RESULT_DECLINED, b"", [], 0.0, "no", buffers)]
    # through a real frame, as the worker sends it and the manager reads it
    stream = b"".join(bytes(p) for p in protocol.encode_frame(protocol.RESULTS, (items,),
                                                              buffers))
    decoder, (frame,) = decode_in_pieces(stream, random.Random(1))
    assert list(protocol.read_result_items(frame.meta[0], frame.buffers)) == [
        (1, 0, protocol.RESULT_OK, big, [b"x"], 0.5, None),
        (2, 0, protocol.RESULT_RAISED, b"exc", [], 0.1, ("ValueError", "m", "tb")),
        (3, 2, protocol.RESULT_DECLINED, b"", [], 0.0, "no")]
