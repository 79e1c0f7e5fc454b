"""What the views of both sides answer with: one error shape, names and values
quoted safely. Nothing below the views knows about HTTP."""

from __future__ import annotations

from typing import Any

from django.http import JsonResponse

from .serialization import PROTOCOL_VERSION

#: Longest name looked up (Target and Data Source names are shorter): anything
#: longer, or with characters a database refuses (NUL), names nothing.
MAX_NAME = 200


def error_response(status: int, message: str, code: str, **extra: Any) -> JsonResponse:
    """An error answer: ``{"protocol": 1, "error": <what was wrong>, "code": <stable id>}``."""
    response = JsonResponse(
        {"protocol": PROTOCOL_VERSION, "error": message, "code": code, **extra}, status=status
    )
    if status == 401:
        response["WWW-Authenticate"] = "Changefeed"
    return response


def plausible_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and "\x00" not in name


def shown(raw: str) -> str:
    """A client's value quoted in an error, cut short."""
    return repr(raw[:40] + ("..." if len(raw) > 40 else ""))
