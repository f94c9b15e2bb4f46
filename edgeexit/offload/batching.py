"""Dynamic batching of offloaded inputs on the server: requests from different boards share one worker call.

The tail's stage files take one input (batch 1), so a batch is not one bigger Invoke: it is one call on a
worker thread that runs the queued inputs one after another (``Runner.continue_from`` for each), off the event
loop. While the worker runs the stages (TFLite releases the GIL in Invoke), the event loop goes on reading,
parsing and answering other requests; requests that arrive meanwhile wait in the queue and go together in the
next call. A batch starts when ``max_size`` inputs are queued, or ``max_latency_s`` after its oldest input
arrived, whichever comes first (0: whatever is queued when the worker is free, no waiting).

Only asyncio and the standard library: the server imports it, and tests can drive it without kserve.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any, Callable, Sequence


class Batcher:
    """Collects items from concurrent coroutines and runs them in batches on one worker thread.

    Args:
        run_batch: items -> one outcome per item, in order; an outcome that is an Exception is raised in the
            coroutine that submitted that item (the other items are answered as usual). Runs on the worker thread.
        max_size: the most items in one batch (>= 1).
        max_latency_s: how long a batch waits for more items after its oldest item arrived (>= 0).
    """

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_size: int, max_latency_s: float):
        if max_size < 1 or not 0 <= max_latency_s <= 10:
            raise ValueError(f"batch size {max_size} must be >= 1 and batch latency {max_latency_s} s in [0, 10]")
        self.run_batch, self.max_size, self.max_latency_s = run_batch, max_size, max_latency_s
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any], float]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgeexit-tail")
        #: counters: batches run, items answered, the largest batch
        self.batches = self.items = self.largest = 0

    async def submit(self, item: Any) -> Any:
        """Queue ``item``; its outcome once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work())
        assert self._queue is not None
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put_nowait((item, future, loop.time()))
        return await future

    async def _work(self) -> None:
        loop, queue = asyncio.get_running_loop(), self._queue
        assert queue is not None
        while True:
            first = await queue.get()
            batch = [first]
            deadline = first[2] + self.max_latency_s
            while len(batch) < self.max_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [entry for entry in batch if not entry[1].done()]  # a cancelled request needs no answer
            if not live:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self.run_batch, [e[0] for e in live])
            except Exception as exc:  # noqa: BLE001 - the whole call failed: every request of it hears why
                outcomes = [exc] * len(live)
            self.batches += 1
            self.items += len(live)
            self.largest = max(self.largest, len(live))
            for (_, future, _), outcome in zip(live, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean": self.items / self.batches if self.batches else None}
