"""Streaming requests held while their engine loads: the head at once, then SSE keep-alive comments.

A model that takes ten minutes to load (or an engine restarting, or swapping in, or started for this
very request) holds its requests for up to ``hold_s``; a request for a serving engine may wait too,
behind another engine's turn (gateway/turns.py) or in its engine's line. So every streaming request
goes through :class:`HeldStream`, and the ones that wait longer than ``HOLD_DETECT_S`` are held. A streaming client that sees nothing for that
long gives up (agents and SDKs time out after a minute or two of silence), so a held streaming
request gets its response head (200, ``text/event-stream``) at once and then an SSE comment line
every ``hold_keepalive_s``::

    : loading tiny 42s (starting)

Comments are ignored by every SSE client (and by the gateway's own token meter: they are never
progress). Once the engine serves the request, its own stream follows on the same response; its
head is already sent, so the engine's status line is dropped, and an error answer (the hold ran out,
the engine failed to start, it refused the request) becomes one SSE ``error`` event in the client's
API shape instead of a silent close:

- OpenAI: ``data: {"error": {"message", "type", "code"}}``
- Anthropic: ``event: error`` + ``data: {"type": "error", "error": {"type", "message"}}``

Keep-alives stop before the first byte of the engine's stream, so they never split an SSE event.
A request that the daemon answers at once (a refusal, an engine already serving) is not held and
keeps its plain JSON answer.

A stream already sent to its engine that got no response head (the engine died or restarted under it;
llama-server sends its head only with the first token, after the whole prefill) is held the same way
while it waits to be sent again (gateway/proxy.py, ``_Forward``): the head after ``HOLD_DETECT_S`` of
waiting, then the same comments.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import JSONResponse

# A request that the daemon decides within this long is answered as usual (a JSON refusal, say):
# only a real wait earns the early head.
HOLD_DETECT_S = 0.1


# The early head of a held stream: the engine's own head, when it comes, is dropped (AfterHead).
EARLY_HEAD = {"type": "http.response.start", "status": 200, "headers": [
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no")]}


async def keep_alive(send: Any, every_s: float, now: Callable[[], float], since_s: float,
                     state: Callable[[], tuple[str, str]], on_comment: Callable[[], None] | None = None) -> None:
    """An SSE comment (``: loading tiny 42s (starting)``) every ``every_s`` until cancelled or the client is gone;
    ``state()`` names the engine and what it is doing."""
    while True:
        await anyio.sleep(every_s)
        name, doing = state()
        comment = f": loading {name} {now() - since_s:.0f}s ({doing})\n\n".encode()
        try:
            await send({"type": "http.response.body", "body": comment, "more_body": True})
        except OSError:
            return  # the client went away: its disconnect ends the hold
        if on_comment is not None:
            on_comment()


def sse_error_bytes(anthropic: bool, body: dict[str, Any]) -> bytes:
    """One SSE error event carrying ``body`` (already in the client's API error shape)."""
    data = json.dumps(body, separators=(",", ":"))
    return (f"event: error\ndata: {data}\n\n" if anthropic else f"data: {data}\n\n").encode()


class HeldStream:
    """The ASGI response for a streaming request whose engine is not serving yet.

    ``route()`` does what any request does (wait for the engine, take a place in its line, build
    the forward) and returns an ASGI response; ``finish(response)`` is called once that response is
    over or was never run (it gives the engine's slot back). ``state()`` names the engine and what
    it is doing, for the comments. ``error_body(status, message, code)`` is an error in the client's
    API shape.
    """

    on_done: Callable[[], None] | None = None  # the engine's slot is given back by ``finish``

    def __init__(
        self,
        route: Callable[[], Awaitable[Any]],
        *,
        anthropic: bool,
        keepalive_s: float,
        now: Callable[[], float],
        state: Callable[[], tuple[str, str]],
        finish: Callable[[Any], None],
        error_body: Callable[[int, str, str], dict[str, Any]],
    ) -> None:
        self.route = route
        self.anthropic = anthropic
        self.keepalive_s = keepalive_s
        self.now = now
        self.state = state
        self.finish = finish
        self.error_body = error_body
        self.held = False  # the early head was sent
        self.comments = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        result: list[Any] = []
        failure: list[Exception] = []
        decided = anyio.Event()
        client_gone = False

        async def run_route() -> None:
            try:
                result.append(await self.route())
            except Exception as exc:  # answered as a 500 either way; with the head sent, as an error event
                result.append(JSONResponse(self.error_body(500, "the gateway failed to route this request; see "
                                                           "the daemon log", "internal_error"), status_code=500))
                failure.append(exc)  # raised once the client has its answer, so the log keeps the traceback
            finally:
                decided.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_route)
                with anyio.move_on_after(HOLD_DETECT_S):
                    await decided.wait()
                if not decided.is_set():
                    held_since_s = self.now()
                    self.held = True
                    await send(EARLY_HEAD)
                    async with anyio.create_task_group() as hold_tg:
                        hold_tg.start_soon(keep_alive, send, self.keepalive_s, self.now, held_since_s, self.state,
                                           self._counted)

                        async def watch_disconnect() -> None:
                            nonlocal client_gone
                            message = await receive()
                            if message["type"] == "http.disconnect":
                                client_gone = True
                                tg.cancel_scope.cancel()  # nobody waits for the engine any more

                        hold_tg.start_soon(watch_disconnect)
                        await decided.wait()
                        hold_tg.cancel_scope.cancel()
            if client_gone or not result:
                return
            response = result[0]
            if not self.held:
                await response(scope, receive, send)
                if failure:
                    raise failure[0]
                return
            held_send = AfterHead(send, self.anthropic, self.error_body)
            await response(scope, receive, held_send)
            # Not to a client that is gone, or cut for not reading (its send would wait for it forever).
            if not (getattr(response, "client_cut", False) or getattr(response, "client_gone", False)):
                await held_send.flush()
            if failure:
                raise failure[0]
        finally:
            if result:
                self.finish(result[0])

    def _counted(self) -> None:
        self.comments += 1


class WatchedRoute:
    """A request that is not streamed, while it waits for its engine (a load, another engine's turn, a place in
    its line): given up when its client leaves. Nothing goes to the client while it waits (a non-streamed
    client reads only the whole answer), but a client that timed out and left (an SDK that then sends the
    same request again) must not keep its place in the line, or have its prompt sent to the engine once its
    turn comes: a retrying client would have its prefill paid two or three times.

    ``route`` decides the answer; ``finish`` gives back what the answer held (its engine slot), also when the
    client left before it ran."""

    on_done: Callable[[], None] | None = None  # the engine's slot is given back by ``finish``

    def __init__(self, route: Callable[[], Awaitable[Any]], finish: Callable[[Any], None]) -> None:
        self.route = route
        self.finish = finish
        self.client_gone = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        result: list[Any] = []
        failure: list[Exception] = []
        try:
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    # The body is read already: the next message is the client's disconnect.
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.client_gone = True
                        tg.cancel_scope.cancel()  # nobody waits for the engine any more

                tg.start_soon(watch_disconnect)
                try:
                    result.append(await self.route())
                except Exception as exc:  # raised below, as the route's own (not in a task group's group)
                    failure.append(exc)
                tg.cancel_scope.cancel()  # decided: the answer watches its client from here
            if failure:
                raise failure[0]
            if self.client_gone or not result:
                return
            await result[0](scope, receive, send)
        finally:
            if result:
                self.finish(result[0])


class AfterHead:
    """``send`` for a response whose head the hold already sent: its own head is dropped, and an
    error answer (status 400 and up) is turned into one SSE error event."""

    def __init__(self, send: Any, anthropic: bool, error_body: Callable[[int, str, str], dict[str, Any]]) -> None:
        self.send = send
        self.anthropic = anthropic
        self.error_body = error_body
        self.status = 200
        self.error_parts: list[bytes] = []
        self.ended = False

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        if self.status < 400:
            if not message.get("more_body", False):
                self.ended = True
            await self.send(message)
            return
        self.error_parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            await self.flush()

    async def flush(self) -> None:
        """End the stream: with the error event when the answer was an error."""
        if self.ended:
            return
        self.ended = True
        if self.status >= 400:
            raw = b"".join(self.error_parts)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            if not isinstance(body, dict) or "error" not in body:
                body = self.error_body(self.status, raw.decode("utf-8", "replace")[:2000] or f"HTTP {self.status}",
                                       "engine_error")
            data = sse_error_bytes(self.anthropic, body)
        else:
            data = b""
        try:
            await self.send({"type": "http.response.body", "body": data, "more_body": False})
        except OSError:
            pass
