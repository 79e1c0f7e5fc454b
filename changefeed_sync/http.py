"""What the views of both sides answer with: one error shape, names and values
quoted safely. Nothing below the views knows about HTTP."""

from __future__ import annotations

import math
import re
from typing import Any

from django.http import HttpRequest, JsonResponse

from .serialization import PROTOCOL_VERSION

#: Longest name looked up (Target and Data Source names are shorter): anything
#: longer, or with characters a database refuses (NUL), names nothing.
MAX_NAME = 200
#: Largest integer a query parameter may carry: positions and keys are 64-bit.
MAX_INT = 2**63 - 1
INTEGER = re.compile(r"-?[0-9]{1,19}")


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


def int_param(request: HttpRequest, name: str, default: int) -> int:
    """A query parameter as a 64-bit integer in plain decimal digits, or ValueError."""
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    if not INTEGER.fullmatch(raw) or not -MAX_INT - 1 <= int(raw) <= MAX_INT:
        raise ValueError(
            f"query parameter {name!r} must be an integer between {-MAX_INT - 1} and "
            f"{MAX_INT}, got {shown(raw)}"
        )
    return int(raw)


def float_param(request: HttpRequest, name: str, default: float) -> float:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        if len(raw) > 40:
            raise ValueError
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"query parameter {name!r} must be a number, got {shown(raw)}")
    return value


def bool_param(request: HttpRequest, name: str) -> bool:
    raw = request.GET.get(name)
    if raw is None or raw in ("", "0"):
        return False
    if raw == "1":
        return True
    raise ValueError(f"query parameter {name!r} must be 0 or 1, got {shown(raw)}")
