"""``GET /api/v1/events``: server-sent events with live snapshots of the host.

Events ``gpus``, ``vgpus``, ``vms``, ``vfs`` and ``problems``, each carrying the whole JSON snapshot — exactly
what ``GET /api/v1/gpus``, ``/vgpus``, ``/vms``, ``/vfs`` and ``/problems`` answer — are sent to a client when it
connects and
again whenever that snapshot changes. An ``error`` event ``{"error", "message", "source"}`` tells
that a snapshot could not be read (the last good one stays): every client gets it, those already
connected when it happens and those that connect while it lasts; it is sent again when the message
changes. A comment line every 15 s keeps
proxies from closing an idle stream.

One shared poller (:class:`EventHub`) reads the host and the state directory every 0.5 s, only while
at least one client is connected; so changes made by anyone — the API, the CLI, mdevctl, libvirt —
show up within about half a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio.to_thread

log = logging.getLogger("vgpuctl.service")

POLL_INTERVAL_S = 0.5
KEEPALIVE_S = 15.0
QUEUE_LIMIT = 64

Snapshotters = dict[str, Callable[[], Any]]


class EventHub:
    """Polls the snapshot functions while someone listens; fans changes out to every subscriber."""

    def __init__(self, snapshotters: Snapshotters, interval_s: float = POLL_INTERVAL_S) -> None:
        self.snapshotters = snapshotters
        self.interval_s = interval_s
        self.latest: dict[str, str] = {}  # event name -> its last JSON text
        self.subscribers: set[asyncio.Queue[tuple[str, str] | None]] = set()
        self.polls = 0  # how many polls ran (tests: the poller stops when nobody listens)
        self._task: asyncio.Task[None] | None = None
        self._errors: dict[str, str] = {}  # snapshot name -> its current error event's JSON text

    @property
    def polling(self) -> bool:
        return self._task is not None and not self._task.done()

    def subscribe(self) -> asyncio.Queue[tuple[str, str] | None]:
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(QUEUE_LIMIT)
        if self.polling:
            for event in self.latest.items():  # what the running poller already read: at once
                queue.put_nowait(event)
            for text in self._errors.values():  # and what it could not read
                queue.put_nowait(("error", text))
        else:
            # Stale since the last poller stopped: its first poll sends everything, errors included.
            self.latest.clear()
            self._errors.clear()
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="vgpuctl-events")
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        self.subscribers.discard(queue)
        if not self.subscribers and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        """Stop polling and end every stream (at shutdown)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue in list(self.subscribers):
            self._offer(queue, None)

    async def _poll(self) -> None:
        while True:
            self.polls += 1
            for name, snapshot in self.snapshotters.items():
                try:
                    text = json.dumps(await anyio.to_thread.run_sync(snapshot), separators=(",", ":"))
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self._error(name, e)
                    continue
                self._errors.pop(name, None)
                if self.latest.get(name) != text:
                    self.latest[name] = text
                    self._broadcast(name, text)
            await asyncio.sleep(self.interval_s)

    def _error(self, name: str, error: Exception) -> None:
        from vgpuctl.service.errors import classify, message_of

        message = message_of(error)
        text = json.dumps({"error": classify(error)[1], "message": message, "source": name})
        if self._errors.get(name) == text:
            return  # told every subscriber once (newcomers get it in subscribe) until it changes
        self._errors[name] = text
        log.warning("events: reading %s failed: %s", name, message)
        self._broadcast("error", text)

    def _broadcast(self, name: str, text: str) -> None:
        for queue in list(self.subscribers):
            self._offer(queue, (name, text))

    def _offer(self, queue: asyncio.Queue[tuple[str, str] | None], item: tuple[str, str] | None) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:  # a client that does not read: drop it rather than grow without bound
            self.subscribers.discard(queue)
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[str]:
        """The text/event-stream body for one client."""
        queue = self.subscribe()
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if item is None:
                    return
                name, text = item
                yield f"event: {name}\ndata: {text}\n\n"
        finally:
            self.unsubscribe(queue)
