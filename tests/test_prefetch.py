"""Work done ahead in a background thread (the GPU decode overlapped with the step): the
same items in the same order, exceptions that reach the consumer as themselves, no thread left
behind by a consumer that stops early, real overlap, and the CUDA stream hand-over, imitated."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from alexnet2gpu.data.base import DatasetError
from alexnet2gpu.data.prefetch import prefetch


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prefetch")]


@pytest.fixture(autouse=True)
def no_thread_left():
    yield
    assert not prefetch_threads()


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_every_item_in_order_and_the_work_off_the_consumers_thread(depth: int) -> None:
    threads = set()

    def square(x: int) -> int:
        threads.add(threading.current_thread().name)
        return x * x

    assert list(prefetch(range(20), square, depth=depth)) == [x * x for x in range(20)]
    assert list(prefetch([], square)) == []
    assert threads and threading.current_thread().name not in threads


def test_an_error_in_the_work_reaches_the_consumer_as_itself_at_its_item() -> None:
    def work(x: int) -> int:
        if x == 3:
            raise DatasetError("unreadable image train/00000.jpegs row 3: bad (drop --strict to skip such images)")
        return x

    got = []
    with pytest.raises(DatasetError) as caught:
        for x in prefetch(range(10), work):
            got.append(x)
    assert got == [0, 1, 2] and str(caught.value).startswith("unreadable image train/00000.jpegs row 3")
    assert not prefetch_threads()


def test_an_error_drawing_the_items_comes_after_the_items_drawn_before_it() -> None:
    def items():
        yield from range(4)
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Terminated.")

    got = []
    with pytest.raises(RuntimeError, match="killed by signal"):
        for x in prefetch(items(), lambda x: x):
            got.append(x)
    assert got == [0, 1, 2, 3]


@pytest.mark.parametrize("stop", ["close", "break", "interrupt", "interrupt-in-work"])
def test_a_consumer_that_stops_early_leaves_no_thread_and_no_work_behind(stop: str) -> None:
    started = []

    def slow(x: int) -> int:
        started.append(x)
        if stop == "interrupt-in-work" and x == 2:
            raise KeyboardInterrupt
        time.sleep(0.05)
        return x

    def consume() -> None:
        stream = prefetch(range(100), slow, depth=2)
        for x in stream:
            if x == 2:
                if stop == "close":
                    stream.close()
                    return
                if stop == "break":
                    break
                raise KeyboardInterrupt

    begun = time.perf_counter()
    with pytest.raises(KeyboardInterrupt) if stop.startswith("interrupt") else contextlib.nullcontext():
        consume()
    assert not prefetch_threads()  # joined when the generator ended, not when it is collected
    assert time.perf_counter() - begun < 2  # a hundred items would take 5 s
    assert len(started) <= 3 + 2 + 1  # at most depth items ahead, and the one under way


def test_a_slow_work_overlaps_a_slow_consumer() -> None:
    n, work_s, step_s = 12, 0.04, 0.04

    def decode(x: int) -> int:
        time.sleep(work_s)  # nvJPEG's decode holds its thread, not the GIL
        return x

    begun = time.perf_counter()
    for _ in prefetch(range(n), decode):
        time.sleep(step_s)  # the training step
    wall = time.perf_counter() - begun
    serial = n * (work_s + step_s)  # 0.96 s one after the other; overlapped about n * 0.04 + 0.04
    assert wall < 0.75 * serial, (wall, serial)


def test_on_cuda_the_work_runs_on_its_own_stream_and_the_consumer_waits_for_it(monkeypatch) -> None:
    """torch.cuda imitated: the thread makes the device and a side stream current around the work and
    records an event after it; the consumer's stream waits on that event and the result's CUDA tensors
    are recorded on the consumer's stream, all before the consumer sees the result."""
    log = []
    local = threading.local()

    class Event:
        def __init__(self, stream):
            self.stream = stream

    class Stream:
        def __init__(self, device=None, name="side"):
            self.device, self.name = device, name

        def record_event(self):
            log.append(("record", self.name, threading.current_thread().name))
            return Event(self)

        def wait_event(self, event):
            log.append(("wait", self.name, event.stream.name))

    consumer = Stream(name="consumer")

    @contextlib.contextmanager
    def stream(s):
        local.stream = s
        yield
        local.stream = None

    @contextlib.contextmanager
    def device(d):
        local.device = d
        yield
        local.device = None

    def record_stream(tensor, s):
        log.append(("record_stream", tuple(tensor.shape), s.name))

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: consumer)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    with FakeTensorMode(allow_non_fake_inputs=True):
        decoded = [torch.empty(k + 1, 3, 8, 8, dtype=torch.uint8, device="cuda:1") for k in range(3)]
    labels = torch.arange(3)

    def decode(k: int):
        log.append(("decode", k, local.device, local.stream.name))
        return decoded[k], labels[: k + 1]

    for k, (images, _) in enumerate(prefetch(range(3), decode, device=torch.device("cuda", 1))):
        assert images is decoded[k]
        log.append(("consume", k))
    cuda1 = torch.device("cuda", 1)
    in_thread = [e[:2] if e[0] == "record" else e for e in log if e[0] in ("decode", "record")]
    assert in_thread == [e for k in range(3) for e in [("decode", k, cuda1, "side"), ("record", "side")]]
    assert all(e[2].startswith("prefetch") for e in log if e[0] == "record")
    for k in range(3):  # wherever the thread's records fall, the consumer waits and records before its use
        used = log.index(("consume", k))
        assert log[used - 2] == ("wait", "consumer", "side")
        assert log[used - 1] == ("record_stream", (k + 1, 3, 8, 8), "consumer")  # the CPU labels are not
