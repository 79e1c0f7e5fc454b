"""Serving the contents of ``file_fields`` to targets, through Django's storage API.

Every snapshot row whose file field names a file carries that file's size and
SHA-256 and a token (signed with the source's SECRET_KEY) that lets an
authenticated target download exactly that file, so the download endpoint
never has to search the table for the name. In increments, the source
describes on request the file a row *currently* references
(``describe_current``). No HTTP here: views.py answers with these.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core import signing
from django.core.exceptions import SuspiciousFileOperation, ValidationError
from django.core.files import File
from django.db import router

from .. import registry
from ..exceptions import BadFileToken, FileOutsideFilter
from ..files import MISSING, OK, REFUSED, SUPERSEDED, digest, storage_of
from ..registry import ModelOptions
from ..selection import Selection
from ..serialization import decode_value

_TOKEN_SALT = "changefeed_sync.files.v1"  # as before the move: tokens already issued still work
# A pull that takes longer than this cannot download the files it listed.
TOKEN_MAX_AGE = 24 * 3600


def describe(
    options: ModelOptions, rows: Iterable[dict[str, Any]], target: str | None = None
) -> None:
    """Add ``files: {field: {name, size, sha256, token} | {name, missing}}`` to snapshot
    rows; the tokens work for ``target`` only, when given."""
    fields = [(name, storage_of(options, name)) for name in options.file_fields]
    for row in rows:
        files: dict[str, Any] = {}
        for field_name, storage in fields:
            name = row["data"].get(field_name)
            if not name:
                continue
            try:
                size, sha = digest(storage, name) if storage.exists(name) else (-1, "")
            except (FileNotFoundError, SuspiciousFileOperation):
                size, sha = -1, ""
            if size < 0:
                files[field_name] = {"name": name, "missing": True}
                continue
            token = _token(options.label, field_name, name, target, row["key"])
            files[field_name] = {"name": name, "size": size, "sha256": sha, "token": token}
        if files:
            row["files"] = files


def _token(
    label: str, field_name: str, name: str, target: str | None = None, key: Any = None
) -> str:
    claims: dict[str, Any] = {"m": label, "f": field_name, "n": name}
    if target is not None:
        claims["t"] = target  # only this Target may use it
    if key is not None:
        claims["k"] = key  # the row that names it: checked for a filtered Target
    return signing.dumps(claims, salt=_TOKEN_SALT, compress=True)


def _lookup(options: ModelOptions, key: Any) -> dict[str, Any]:
    """The ORM lookups of the row with natural key ``key`` (wire form); ValueError,
    TypeError, LookupError or ValidationError when it is not one."""
    key = list(key)
    if len(key) != len(options.lookups):
        raise ValueError(f"a key of {options.label} has {len(options.lookups)} parts")
    return {
        path: decode_value(f, value)
        for path, f, value in zip(options.lookups, options.key_fields, key, strict=True)
    }


def describe_current(
    item: Any, *, target: str, selection: Selection | None = None, using: str
) -> dict[str, Any]:
    """What a target asking about one file of an increment gets (``POST files/``).

    ``item`` is ``{"model", "key", "field", "name"}``. Only a file that the
    registered row of that model with that natural key references *now* in
    that ``file_fields`` field is described, so the endpoint never serves an
    arbitrary storage path: ``{"status": "ok", size, sha256, token}`` (the token
    works for this Target only), ``superseded`` when the row is gone or
    references another name (a later event carries that state), ``missing``
    when the row references the name but the storage lacks it, ``refused``
    for a model or field this Target does not receive or a malformed item. A row
    outside the Target's row filters (``selection``) is one it does not have:
    ``superseded``, as a row gone.
    """
    selection = selection or Selection.everything()
    try:
        label, field_name = str(item["model"]), str(item["field"])
        name, key = str(item["name"]), list(item["key"])
    except (KeyError, TypeError, ValueError):
        return {"status": REFUSED}
    options = registry.options_for_label(label)
    if (
        options is None
        or field_name not in options.file_fields
        or not selection.offers(label)
        or len(key) != len(options.lookups)
        or not name
    ):
        return {"status": REFUSED}
    try:
        current = (
            selection.rows(options, using)
            .filter(**_lookup(options, key))
            .values_list(field_name, flat=True)
            .first()
        )
    except (ValueError, TypeError, LookupError, ValidationError):
        return {"status": REFUSED}
    if current != name:  # the row is gone (or outside the filter), or references another file
        return {"status": SUPERSEDED}
    storage = storage_of(options, field_name)
    try:
        if not storage.exists(name):
            return {"status": MISSING}
        size, sha = digest(storage, name)
    except (FileNotFoundError, SuspiciousFileOperation):
        return {"status": MISSING}
    return {
        "status": OK,
        "size": size,
        "sha256": sha,
        "token": _token(label, field_name, name, target, key),
    }


def open_listed(
    token: str,
    requester: str | None = None,
    *,
    selection: Selection | None = None,
    using: str | None = None,
) -> tuple[File[Any], int]:
    """The file a token names, opened for reading, and its size.

    Raises BadFileToken for a token this source did not sign (or too old, or
    issued to another Target than ``requester``, or of a model ``selection``, what
    the requester reads, leaves out), FileOutsideFilter when the requester's row
    filters restrict the model and no row inside them references the file now
    (read on ``using``), FileNotFoundError when the file is gone since it was listed.
    """
    selection = selection or Selection.everything()
    try:
        claims = signing.loads(token, salt=_TOKEN_SALT, max_age=TOKEN_MAX_AGE)
        label, field_name, name = str(claims["m"]), str(claims["f"]), str(claims["n"])
    except (signing.BadSignature, KeyError, TypeError) as exc:
        raise BadFileToken(f"bad or expired file token ({exc})") from None
    if "t" in claims and claims["t"] != requester:
        raise BadFileToken("file token issued to another target")
    if not selection.offers(label):
        # The same answer as a forged token: nothing tells whether the model exists.
        raise BadFileToken("bad or expired file token (not a model this target receives)")
    options = registry.options_for_label(label)
    if options is None or field_name not in options.file_fields:
        raise BadFileToken(f"{label}.{field_name} is not a synced file field here")
    if selection.rows_filter(options.label) is not None:
        _check_inside(options, field_name, name, claims.get("k"), selection, using)
    storage = storage_of(options, field_name)
    try:
        if not storage.exists(name):
            raise FileNotFoundError(name)
        size = storage.size(name)
        return storage.open(name, "rb"), size
    except SuspiciousFileOperation:
        raise FileNotFoundError(name) from None


def _check_inside(
    options: ModelOptions,
    field_name: str,
    name: str,
    key: Any,
    selection: Selection,
    using: str | None,
) -> None:
    """FileOutsideFilter unless a row inside the selection's filter references ``name``
    in ``field_name`` now: first the row the token was issued for (by its natural key,
    an indexed lookup), then any row (a token without a key, issued before tokens
    carried one; a file another row inside the filter names too)."""
    using = using or router.db_for_read(options.model)
    rows = selection.rows(options, using).filter(**{field_name: name})
    if key is not None:
        try:
            if rows.filter(**_lookup(options, key)).exists():
                return
        except (ValueError, TypeError, LookupError, ValidationError):
            pass  # not a key of this model: a row that names the file may still do
    if not rows.exists():
        raise FileOutsideFilter(
            f"no row of {options.label} inside the target's row filters references {name!r}"
        )
