"""The feed served straight from the ASGI server, beside Django's own handler.

``views.feed_view`` is async, so under Django's ASGI handler a waiting follower holds
no server worker. But that handler passes every request through each synchronous
middleware and request signal receiver in a thread of the request's own (asgiref's
``ThreadSensitiveContext``): measured here, about 12 thread hops per feed answer,
so one event that woke 150 followers took 0.5 s to answer them all, and each
waiting follower kept an idle thread. ``feed_application`` answers the feed's URL
itself (the same view: authentication, errors and headers alike) without the
middleware and the request signals, and hands every other request to the
application it wraps:

    # the project's asgi.py
    from django.core.asgi import get_asgi_application
    from changefeed_sync.asgi import feed_application

    application = feed_application(get_asgi_application())

The feed needs none of the middleware: requests are authenticated by their
signature, nothing reads a session, a cookie or a CSRF token, and the view's
database work runs in threads that check their connections as a request would
(longpoll.py). The host is still checked against ``ALLOWED_HOSTS``; answers of 400
and up are logged as Django logs them. Other projects' middleware (metrics, an
HTTPS redirect) does not see feed requests: serve the feed over HTTPS by your
proxy's rules, or wrap nothing and keep Django's handler for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.core.handlers.exception import response_for_exception
from django.http import HttpResponse, StreamingHttpResponse
from django.urls import NoReverseMatch, reverse
from django.utils.log import log_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("changefeed_sync.asgi")


def feed_application(app: ASGIApp, *, path: str | None = None) -> ASGIApp:
    """An ASGI application answering feed requests itself and passing the rest to ``app``.

    ``path``: the feed's path (without the server's root path); by default where the
    URLconf puts ``changefeed_sync:feed``, looked up on the first request.
    """
    feed_path: list[str | None] = [path]
    looked_up = [path is not None]

    def the_feed_path() -> str | None:
        if not looked_up[0]:
            looked_up[0] = True
            try:
                feed_path[0] = reverse("changefeed_sync:feed")
            except NoReverseMatch:
                logger.warning(
                    "no URL named changefeed_sync:feed: feed requests go through %r", app
                )
        return feed_path[0]

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _path_info(scope) == the_feed_path():
            await _serve(scope, receive, send)
        else:
            await app(scope, receive, send)

    return application


def _path_info(scope: Scope) -> str:
    """The request's path below the server's root path, as Django's request computes it."""
    path = str(scope["path"])
    root = str(scope.get("root_path") or "").rstrip("/")
    if root and (path.startswith(root + "/") or path == root):
        return path[len(root) :]
    return path


async def _serve(scope: Scope, receive: Receive, send: Send) -> None:
    body = bytearray()
    while True:  # the request's body (a feed request has none, but it must be read)
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    request = ASGIRequest(scope, io.BytesIO(bytes(body)))
    answer = asyncio.ensure_future(_answer(request, send))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        # A follower that goes away while its long-poll waits, or while its stream
        # runs, stops it (a server may drop what is sent to a closed connection
        # without a word: the stream would go on reading for nobody).
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
    if answer.cancelled() or not answer.done():
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        return
    answer.result()


async def _answer(request: ASGIRequest, send: Send) -> None:
    response = await _respond(request)
    if response.status_code >= 400 and isinstance(response, HttpResponse):  # never a stream
        log_response(
            "%s: %s", response.reason_phrase, request.path, response=response, request=request
        )
    await _send(response, send)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(request: ASGIRequest) -> HttpResponse | StreamingHttpResponse:
    from .source.views import feed_view

    try:
        request.get_host()  # ALLOWED_HOSTS, as CommonMiddleware would check it
        return await feed_view(request)
    except Exception as exc:  # an answer, as Django's handler gives one (400, 500)
        response = await sync_to_async(response_for_exception, thread_sensitive=False)(request, exc)
        assert isinstance(response, HttpResponse)  # Django's error answers are plain ones
        return response


async def _send(response: HttpResponse | StreamingHttpResponse, send: Send) -> None:
    headers = [(name.encode("ascii"), value.encode("latin-1")) for name, value in response.items()]
    if isinstance(response, StreamingHttpResponse):
        # The streamed feed: each line sent as it comes (the server chunks them).
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        async for chunk in response:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    content = response.content
    if not response.has_header("Content-Length"):
        headers.append((b"Content-Length", str(len(content)).encode("ascii")))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": content})
