"""Large bytes-like payloads travel out of band and arrive as what they were: ``bytes`` as
``bytes``, ``bytearray`` as ``bytearray``, memoryviews with their format and shape, arrays with
their writability, shared objects still shared; only the kernel copies them."""

from __future__ import annotations

import array
import mmap
import pickle
import random

import numpy as np
import pytest

from distexec import DistributedExecutor, protocol, serialization
from helpers import identity

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def through_a_decoder(obj, chunk=1 << 16):
    """Pickle ``obj`` as a worker does, send it as one frame through a FrameDecoder in pieces,
    and unpickle what comes out. Returns (object, pickle bytes, buffers as received)."""
    data, bufs = serialization.dumps(obj)
    stream = b"".join(bytes(p) for p in protocol.encode_frame(protocol.RESULTS, (1,),
                                                              [data, *bufs]))
    decoder = protocol.FrameDecoder()
    frames, pos = [], 0
    while pos < len(stream):
        view = decoder.recv_buffer()
        n = min(len(view), chunk, len(stream) - pos)
        view[:n] = stream[pos:pos + n]
        pos += n
        frames += decoder.feed(n)
    (frame,) = frames
    return serialization.loads(frame.buffers[0], frame.buffers[1:]), data, frame.buffers


def test_large_bytes_are_not_copied_into_the_pickle():
    big = random.randbytes(2 * MiB)
    data, bufs = serialization.dumps((big, {"again": big}))
    assert len(data) < 1024, "the bytes went into the pickle"
    assert len(bufs) == 1 and bufs[0].obj is big, "not a view of the caller's object"


def test_small_bytes_stay_in_band():
    data, bufs = serialization.dumps(b"x" * 1000)
    assert bufs == [] and not data.startswith(serialization.OOB_MARK)


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_types_and_sharing_survive(chunk):
    big = random.randbytes(MiB)
    ba = bytearray(random.randbytes(MiB))
    obj = (big, [big, ba], {"view": memoryview(big)[10:-10]}, 7)
    back, _, received = through_a_decoder(obj, chunk)
    assert type(back[0]) is bytes and back[0] == big
    assert back[1][0] is back[0], "one object sent twice must arrive as one object"
    assert type(back[1][1]) is bytearray and back[1][1] == ba
    view = back[2]["view"]
    assert type(view) is memoryview and view.readonly and bytes(view) == big[10:-10]
    assert back[3] == 7
    # The read-only buffers were received into bytes objects, the writable one into a bytearray.
    assert [type(b) for b in received[1:]] == [bytes, bytearray, bytes]


def test_memoryview_keeps_format_shape_and_writability():
    arr = np.arange(64 * 1024, dtype=np.float64).reshape(256, 256)
    back, _, _ = through_a_decoder(memoryview(arr))
    assert (back.format, back.shape, back.readonly) == ("d", (256, 256), False)
    assert back.tolist() == memoryview(arr).tolist()


def test_arrays_keep_their_writability():
    writable = np.arange(200_000, dtype=np.int64)
    frozen = writable.copy()
    frozen.flags.writeable = False
    back, _, received = through_a_decoder((writable, frozen))
    assert back[0].flags.writeable and not back[1].flags.writeable
    # A writable array's memory arrives in anonymous memory (no zero fill), a read-only one's
    # in a bytes object.
    assert [type(b) for b in received[1:]] == [mmap.mmap, bytes]
    assert (back[0] == writable).all() and (back[1] == frozen).all()


def test_a_buffer_deep_inside_goes_out_of_band():
    big = random.randbytes(MiB)
    deep = [[[[[[{"k": (big,)}]]]]]]
    data, bufs = serialization.dumps(deep)
    assert data.startswith(serialization.OOB_MARK) and len(data) < 1024
    back, _, _ = through_a_decoder(deep)
    assert back == deep


def test_a_buffer_the_quick_look_misses_still_round_trips_in_band():
    big = random.randbytes(MiB)
    far = [0] * 100 + [big]  # the quick look reads the first 8 items of a long list
    data, bufs = serialization.dumps(far)
    assert not data.startswith(serialization.OOB_MARK) and len(data) > MiB
    back, _, _ = through_a_decoder(far)
    assert back == far


def test_with_a_lambda_the_buffers_still_go_out_of_band():
    big = random.randbytes(MiB)
    fn = lambda: 1  # noqa: E731  (pickled by value: the cloudpickle path)
    data, bufs = serialization.dumps((fn, big))
    assert data.startswith(serialization.OOB_MARK) and len(data) < 64 * 1024
    back, _, _ = through_a_decoder((fn, big))
    assert back[0]() == 1 and back[1] == big


def test_missing_buffers_are_a_clear_unpickling_error():
    data, _ = serialization.dumps(random.randbytes(MiB))
    with pytest.raises(pickle.UnpicklingError, match="more out-of-band buffers"):
        serialization.loads(data, [])


def test_strided_memoryview_arrives_as_a_contiguous_copy():
    arr = np.arange(100_000.0).reshape(1000, 100)[:, ::2]
    back, _, _ = through_a_decoder(memoryview(arr))
    assert (back.format, back.shape, back.c_contiguous) == ("d", (1000, 50), True)
    assert back.tolist() == arr.tolist()


class StateInAView:
    """Its state is a temporary memoryview, freed once pickled: its id is soon reused."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (StateInAView, (None,), memoryview(array.array("d", [self.value] * 4)))

    def __setstate__(self, state):
        self.value = state.tolist()


def test_temporary_views_are_not_mistaken_for_one_another():
    obj = (memoryview(b"x"), [StateInAView(1.0), StateInAView(2.0), StateInAView(3.0)])
    back, _, _ = through_a_decoder(obj)
    assert [a.value for a in back[1]] == [[1.0] * 4, [2.0] * 4, [3.0] * 4]


def test_thousands_of_buffers_go_in_band():
    arrays = [np.full(8, i) for i in range(3000)]
    data, bufs = serialization.dumps(arrays)
    assert len(bufs) <= serialization.MAX_OOB_BUFFERS
    back, _, _ = through_a_decoder(arrays)
    assert all((a == b).all() for a, b in zip(back, arrays, strict=True))


def test_looking_for_buffers_is_bounded_however_items_are_shared():
    """64**5 paths to 64 leaves: a look that walked every path would never end (the test's
    timeout says so), a bounded one returns at once."""
    leaf = [1j] * 64
    shared = [[[[leaf] * 64] * 64] * 64] * 64
    assert serialization._has_big_buffer(shared) is False
    data, bufs = serialization.dumps(shared)
    assert serialization.loads(data, bufs) == shared


def test_a_bytearray_may_change_once_submitted():
    """It is copied when pickled (a bytes object in band would be copied too), so the caller
    may resize it at once, and the task sees it as it was."""
    with DistributedExecutor(max_workers=1) as ex:
        ba = bytearray(MiB)
        future = ex.submit(len, ba)
        ba.extend(b"more")  # BufferError if the send still held an export of it
        assert future.result(timeout=60) in (MiB, MiB + 4)


def read_shared(name):
    from distexec import retrieve

    value = retrieve(name)
    return value.flags.writeable, float(value.sum())


def test_shared_data_keeps_writability():
    with DistributedExecutor(max_workers=1) as ex:
        ex.store("w", np.ones(300_000))
        frozen = np.ones(300_000)
        frozen.flags.writeable = False
        ex.store("r", frozen)
        assert ex.submit(read_shared, "w").result(timeout=60) == (True, 300_000.0)
        assert ex.submit(read_shared, "r").result(timeout=60) == (False, 300_000.0)


@pytest.fixture
def ex():
    with DistributedExecutor(max_workers=1) as executor:
        yield executor


def test_round_trip_through_a_worker(ex):
    big = random.randbytes(8 * MiB)
    ba = bytearray(random.randbytes(3 * MiB))
    arr = np.arange(MiB, dtype=np.float32)
    out = ex.submit(identity, (big, ba, memoryview(big), arr, [big])).result(timeout=60)
    assert type(out[0]) is bytes and out[0] == big
    assert type(out[1]) is bytearray and out[1] == ba
    assert type(out[2]) is memoryview and bytes(out[2]) == big
    assert out[3].dtype == np.float32 and out[3].flags.writeable and (out[3] == arr).all()
    assert out[4][0] is out[0]
    # and through map's chunks, and in both directions with a big bytes result of a small call
    assert list(ex.map(len, [big, ba], chunksize=2, timeout=60)) == [len(big), len(ba)]
    assert ex.submit(bytes, 5 * MiB).result(timeout=60) == bytes(5 * MiB)


def test_without_ctypes_read_only_buffers_are_copied_once(monkeypatch):
    monkeypatch.setattr(protocol, "_new_bytes", None)
    big = random.randbytes(MiB)
    back, _, received = through_a_decoder((big, bytearray(big)))
    assert type(back[0]) is bytes and back[0] == big and type(back[1]) is bytearray
    assert [type(b) for b in received[1:]] == [bytearray, bytearray]
