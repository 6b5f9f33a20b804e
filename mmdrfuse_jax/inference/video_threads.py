"""The reader and writer threads of `video`'s fusion, and how they stop and drain.

While the network fuses a batch, one thread decodes (or reads) the next frames (`Ahead`) and
another encodes (or writes) the fused ones (`Behind`), so decoding, fusing and encoding
overlap. The threads stop within a batch of a stop: a thread waiting on a full or empty queue
looks for it every `_POLL_S` seconds, and its end is waited for in a way signals cannot cut
short (`_Thread`), so that what it uses is freed only once it has ended (the decoders are
freed in the caller's thread: `video_codecs.Decoders.close` says why).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Callable, Iterator, Optional

_POLL_S = 0.1  # how often a thread waiting on a full or empty queue looks for a stop

_END = object()


class _Thread:
  """A daemon thread running `target`, with a wait for its end that signals cannot cut short.

  `wait` returns once `target` has returned. An exception a signal handler raises meanwhile
  (KeyboardInterrupt after a second Ctrl-C, `interrupts.Interrupted`) is raised again after
  that, which is within a batch: what the thread uses (the decoders, the encoder) is freed once
  `wait` returns, and freeing it under the running thread would crash the process. The wait is
  on an event of its own: a `Thread.join` cut short by an exception can mark a thread that is
  still running as ended (Python 3.11).
  """

  def __init__(self, target: Callable[[], None]):
    self._target = target
    self._ended = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    try:
      self._target()
    finally:
      self._ended.set()

  def running(self) -> bool:
    return not self._ended.is_set()

  def wait(self) -> None:
    pending: Optional[BaseException] = None
    while True:
      try:
        self._ended.wait()
        self._thread.join()  # only Python's own bookkeeping is left
        break
      except BaseException as e:  # pylint: disable=broad-except  (raised again below)
        pending = pending or e
    if pending is not None:
      raise pending


class Ahead:
  """Iterates `items` in a thread, at most `depth` items ahead of the reader.

  An exception in the thread is raised again in the reader. `close` stops the thread, waits
  until it has ended, then closes `items` (a generator) in the calling thread, so that nothing
  is finished or freed in the thread but the items themselves.
  """

  def __init__(self, items: Iterator, depth: int):
    self._items = items
    self._queue: queue.Queue = queue.Queue(depth)
    self._closed = threading.Event()
    self._thread = _Thread(self._run)

  def _run(self) -> None:
    try:
      for item in self._items:
        if not self._put(("item", item)):
          return
      self._put(("end", None))
    except BaseException as e:  # pylint: disable=broad-except  (handed to the reader)
      self._put(("error", e))

  def _put(self, entry) -> bool:
    while not self._closed.is_set():
      with contextlib.suppress(queue.Full):
        self._queue.put(entry, timeout=_POLL_S)
        return True
    return False

  def __iter__(self) -> Iterator:
    while True:
      kind, value = self._queue.get()
      if kind == "end":
        return
      if kind == "error":
        raise value
      yield value

  def close(self) -> None:
    self._closed.set()
    self._thread.wait()
    if hasattr(self._items, "close"):
      self._items.close()


class Behind:
  """Calls `handle(item)` in a thread for each item `put`, at most `depth` items behind.

  The first exception `handle` raises is raised again by the next `put` or by `finish`.
  """

  def __init__(self, handle: Callable[[Any], None], depth: int):
    self._handle = handle
    self._queue: queue.Queue = queue.Queue(depth)
    self._error: Optional[BaseException] = None
    self._dropping = False
    self._thread = _Thread(self._run)

  def _run(self) -> None:
    while True:
      try:
        item = self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        if self._dropping:  # closed, and nothing is left to drop
          return
        continue
      if item is _END:
        return
      if self._error is None and not self._dropping:
        try:
          self._handle(item)
        except BaseException as e:  # pylint: disable=broad-except  (raised in the caller)
          self._error = e

  def put(self, item) -> None:
    while True:
      if self._error is not None:
        raise self._error
      with contextlib.suppress(queue.Full):
        self._queue.put(item, timeout=_POLL_S)
        return

  def finish(self) -> None:
    """Waits until every item is handled; raises the thread's exception, if any."""
    if self._thread.running():
      self.put(_END)
      self._thread.wait()
    if self._error is not None:
      raise self._error

  def close(self) -> None:
    """Drops the items not yet handled and waits for the thread to end (it finishes the item in
    hand)."""
    self._dropping = True  # No blocking put here: the thread sees this within _POLL_S.
    self._thread.wait()

