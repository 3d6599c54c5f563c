"""Background I/O threads: a bounded queue of work run on a thread of its own (`BackgroundIO`), and an iterator read
ahead on one (`prefetched`). A failure on the thread is raised on the caller's; after a failure nothing queued runs.
"""

from __future__ import annotations

from typing import Any, Iterator


class BackgroundIO:
    """Runs file writes (or any calls) on one background thread, in the order they are submitted, while the caller
    quantizes the next tensor (the write syscalls release the GIL while torch computes). At most
    `max_pending_bytes` of buffers wait (plus the one just submitted), so memory stays bounded; a failure in the
    background is raised in the caller at its next submit or at the end, and what was queued after it does not run.

        with BackgroundIO() as io:
            for name, tensor in prefetched(iter_tensors(files, digest)):
                io.submit(writer.write, name, transform(tensor), nbytes=...)
    """

    def __init__(self, max_pending_bytes: int = 128 * 2**20, name: str = "bitcpm-io"):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque = deque()
        self._pending_bytes, self._limit = 0, max_pending_bytes
        self._failed = False  # set by the background thread: what was queued after a failure does not run

    def _run(self, fn, args) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, fn, *args, nbytes: int = 0) -> None:
        self._pending.append((self._pool.submit(self._run, fn, args), nbytes))
        self._pending_bytes += nbytes
        while self._pending and (self._pending[0][0].done() or self._pending_bytes > self._limit):
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        future, nbytes = self._pending.popleft()
        self._pending_bytes -= nbytes
        future.result()

    def drain(self) -> None:
        """Wait for everything submitted (raising the first failure)."""
        while self._pending:
            self._wait_oldest()

    def __enter__(self) -> "BackgroundIO":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            for future, _ in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)  # nothing runs on once the caller moves on (to clean up, say)


def prefetched(items: Iterator[tuple[str, Any]], max_bytes: int = 64 * 2**20,
               name: str = "bitcpm-read") -> Iterator[tuple[str, Any]]:
    """(name, tensor) pairs of `items`, read ahead on a background thread (file reads release the GIL) while the
    caller works on the previous ones. Reading stops while more than `max_bytes` of tensors wait, so at most that
    plus one tensor is held ahead. A failure while reading is raised in the caller, in its place in the order."""
    import threading
    from collections import deque

    ready: deque = deque()
    state = {"bytes": 0, "stop": False, "done": False, "error": None}
    changed = threading.Condition()

    def read() -> None:
        try:
            for name, tensor in items:
                with changed:
                    ready.append((name, tensor))
                    state["bytes"] += tensor.nbytes
                    changed.notify_all()
                    changed.wait_for(lambda: state["stop"] or state["bytes"] <= max_bytes)
                    if state["stop"]:
                        return
        except BaseException as exc:  # handed to the caller, raised there
            state["error"] = exc
        finally:
            with changed:
                state["done"] = True
                changed.notify_all()

    reader = threading.Thread(target=read, name=name, daemon=True)
    reader.start()
    try:
        while True:
            with changed:
                changed.wait_for(lambda: ready or state["done"])
                if not ready:
                    if state["error"] is not None:
                        raise state["error"]
                    return
                name, tensor = ready.popleft()
                state["bytes"] -= tensor.nbytes
                changed.notify_all()
            yield name, tensor
    finally:
        with changed:
            state["stop"] = True
            changed.notify_all()
        reader.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()
