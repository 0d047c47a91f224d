"""Cross-request batching: Batcher merges concurrent requests to one signature in kseg serve (like
TF Serving's max_batch_size / batch_timeout_micros); execute runs a list of Tasks as one call (also
what kseg worker does with the requests it pulls from the broker)."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from kseg.serving.errors import ServingError


def batch_key(inputs):
    """Requests with equal keys (input names, dtypes, shapes past the batch dimension) can merge."""
    return tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(inputs.items()))


class Task:
    """One request's inputs and rows; its result or error once run."""

    __slots__ = ("done", "error", "inputs", "key", "result", "rows")

    def __init__(self, inputs, rows, key):
        self.inputs, self.rows, self.key = inputs, rows, key
        self.done = threading.Event()
        self.result = self.error = None


class Batcher:
    """Merges concurrent requests to one signature into batches of up to max_batch_size rows.

    A worker takes the oldest queued request, adds queued requests of the same input shapes
    until the batch is full or batch_timeout has passed since it started waiting, runs one
    call and splits the outputs by request. A request larger than max_batch_size runs alone.
    If a merged batch fails (one request's image does not decode), each of its requests
    runs alone, so only the bad one gets the error.
    """

    def __init__(self, signature, *, max_batch_size=32, batch_timeout=0.002, num_threads=1, max_queued_rows=4096):
        self.signature = signature
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout = max(0.0, float(batch_timeout))
        self.max_queued_rows = max_queued_rows
        self._queue = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.batches = self.batched_rows = 0  # counters: mean batch size = batched_rows / batches
        self._threads = [threading.Thread(target=self._loop, name=f"batcher-{signature.name}-{i}", daemon=True)
                         for i in range(max(1, int(num_threads)))]
        for t in self._threads:
            t.start()

    def submit(self, inputs, rows):
        task = Task(inputs, rows, batch_key(inputs))
        with self._cond:
            if self._stopped:
                raise ServingError("UNAVAILABLE", "the servable is shutting down")
            if self._queued_rows + rows > self.max_queued_rows and self._queue:
                raise ServingError("UNAVAILABLE", f"the batch queue is full ({self._queued_rows} rows waiting)")
            self._queue.append(task)
            self._queued_rows += rows
            self._cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=60)

    def _take(self):
        """The next batch (under the lock), or None when stopped and drained."""
        with self._cond:
            while not self._queue:
                if self._stopped:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, rows = [first], first.rows
            deadline = time.monotonic() + self.timeout
            while rows < self.max_batch_size:
                i = 0
                while i < len(self._queue) and rows < self.max_batch_size:
                    task = self._queue[i]
                    if task.key == first.key and rows + task.rows <= self.max_batch_size:
                        batch.append(task)
                        rows += task.rows
                        del self._queue[i]
                    else:
                        i += 1
                remaining = deadline - time.monotonic()
                if rows >= self.max_batch_size or remaining <= 0 or self._stopped:
                    break
                self._cond.wait(remaining)
            self._queued_rows -= rows
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch):
        calls, rows = execute(self.signature, batch)
        self.batches += calls
        self.batched_rows += rows
        for task in batch:
            task.done.set()


def execute(signature, batch):
    """Run tasks of equal input shapes as one merged call; set each task's result or error.

    If the merged call fails, each task runs alone, so only a bad request gets the error.
    Returns (calls, rows) run.
    """
    rows = sum(t.rows for t in batch)
    try:
        if len(batch) == 1:
            batch[0].result = signature.run(batch[0].inputs)
        else:
            _run_merged(signature, batch)
    except Exception as e:  # noqa: BLE001 - every failure goes back to its request
        if len(batch) > 1:
            again = [execute(signature, [task]) for task in batch]
            return 1 + sum(c for c, _ in again), rows + sum(r for _, r in again)
        batch[0].error = e if isinstance(e, ServingError) else ServingError("INTERNAL", f"{type(e).__name__}: {e}")
    return 1, rows


def _run_merged(signature, batch):
    names = list(batch[0].inputs)
    merged = {k: np.concatenate([t.inputs[k] for t in batch]) for k in names}
    outputs = signature.run(merged)
    total = sum(t.rows for t in batch)
    if any(v.ndim == 0 or v.shape[0] != total for v in outputs.values()):
        raise RuntimeError("outputs without a batch dimension cannot be split")  # each runs alone
    start = 0
    for task in batch:
        part = {k: v[start:start + task.rows] for k, v in outputs.items()}
        if signature.trims_padding and task.rows and part["label_map"].ndim == 3:
            h, w = part["image_size"].reshape(task.rows, -1)[:, :2].max(axis=0)
            part["label_map"] = part["label_map"][:, :h, :w]
        task.result = part
        start += task.rows
