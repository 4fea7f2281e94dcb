"""Work on a stream's items done ahead of the consumer, in one background thread.

`batches` uses it for the GPU decode of staged JPEGs (`StagedImages.decode_batch`, nvJPEG through
torchvision's `decode_jpeg(..., device="cuda")`): that call blocks its thread until the decode is
done (it ends in cudaStreamSynchronize on nvJPEG's stream) and releases the GIL meanwhile, so in a
thread of its own the next batch decodes while the training step of this one runs, not between steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T], work: Callable[[T], R], *, depth: int = 2, device: torch.device | None = None
) -> Iterator[R]:
    """`work(item)` for every item, in order, computed in a background thread up to `depth` items
    ahead of the one the consumer holds.

    The items are drawn in the consumer's thread: a DataLoader and its worker processes stay with
    the thread that started them, and a stop never waits on a worker. An exception raised by `work`
    reaches the consumer as itself, at its item; one raised drawing an item, after the items drawn
    before it, as it would without the thread. When the consumer stops early (a closed generator,
    an exception, KeyboardInterrupt), the work not begun is dropped, the one under way finishes, and
    the thread is joined before this generator ends.

    On a CUDA `device`, `work` runs with that device current and on a stream of its own; the consumer's
    current stream waits on an event recorded after it, and every CUDA tensor of the result is marked
    as used by that stream (`record_stream`), so that the caching allocator does not give its memory
    to the side stream while the consumer's kernels may still read it.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    side = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None

    def run(item: T) -> tuple[R, torch.cuda.Event | None]:
        if side is None:
            return work(item), None
        # the current device and stream are per thread: this one starts on device 0's default stream
        with torch.cuda.device(device), torch.cuda.stream(side):
            return work(item), side.record_event()

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    pending: deque[Future] = deque()
    iterator, failure = iter(items), None
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception as error:  # noqa: BLE001 - raised below, after the items drawn before it
                failure = error
                break
            pending.append(pool.submit(run, item))
            if len(pending) > depth:
                yield _hand_over(*pending.popleft().result(), device)
        while pending:
            yield _hand_over(*pending.popleft().result(), device)
        if failure is not None:
            raise failure
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _hand_over(result: R, event: torch.cuda.Event | None, device: torch.device | None) -> R:
    """The result, safe to use on the consumer's current stream."""
    if event is not None:
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)
        for tensor in _tensors(result):
            if tensor.is_cuda:
                tensor.record_stream(stream)
    return result


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
