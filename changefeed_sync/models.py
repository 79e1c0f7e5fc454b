"""Tables: the source's outbox and targets, the target's data sources."""

from __future__ import annotations

import math
import secrets as _secrets
import string
import zlib
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

_name_validator = RegexValidator(
    r"^[A-Za-z0-9_.-]+$", "Use letters, digits, '.', '_' or '-' (it travels in a header)."
)


def split_secrets(text: str) -> list[str]:
    """One secret per line; the last is current, the others stay valid during a rotation.

    Only line feeds separate secrets (a CR before one is ignored): a secret may contain
    spaces, tabs or any other character. Blank lines and whitespace around a line are
    ignored, as they always were; rows written by the former admin, which split its input
    on whitespace, hold one secret per line and read the same.
    """
    return [line.strip() for line in text.split("\n") if line.strip()]


#: A shared secret must carry at least this many bits of entropy (32 random bytes).
SECRET_MIN_BITS = 256

_HEX = (frozenset("0123456789abcdef"), frozenset("0123456789ABCDEF"))
_BASE64 = frozenset(string.ascii_letters + string.digits + "-_+/=")


def generate_secret() -> str:
    """A new shared secret: 32 random bytes, base64url (43 characters)."""
    return _secrets.token_urlsafe(32)


def secret_bits(secret: str) -> float:
    """A generous estimate of a secret's entropy, in bits.

    Its length times log2 of the alphabet it seems drawn from (digits: 10, hex: 16,
    base64 with at least two of lower case, upper case and digits: 64, otherwise the
    letter and digit classes it uses plus each other character it uses), but never
    more than 8 bits per byte of its zlib-compressed form, so repetitions
    ("aaaa…", "abcabc…") count for little. 32 random bytes as
    ``secrets.token_urlsafe(32)``, ``token_hex(32)`` or ``openssl rand -base64 32``
    write them score 256 or more.
    """
    chars = set(secret)
    if len(chars) < 2:
        return 0.0
    lower = bool(chars & set(string.ascii_lowercase))
    upper = bool(chars & set(string.ascii_uppercase))
    digits = bool(chars & set(string.digits))
    if chars <= set(string.digits):
        alphabet = 10
    elif any(chars <= hex_digits for hex_digits in _HEX):
        alphabet = 16
    elif chars <= _BASE64 and lower + upper + digits >= 2:
        alphabet = 64
    else:
        others = chars - set(string.ascii_letters + string.digits)
        alphabet = 26 * lower + 26 * upper + 10 * digits + len(others)
    by_alphabet = len(secret) * math.log2(alphabet)
    compressed = zlib.compress(secret.encode(), 9)
    by_compression = 8 * (len(compressed) - 6)  # zlib's header and checksum
    return min(by_alphabet, by_compression)


def validate_secret(secret: str) -> None:
    """ValidationError unless ``secret`` is one strong shared secret (never echoed)."""
    if "\n" in secret or "\r" in secret:
        raise ValidationError(
            "A secret cannot contain a line break (line breaks separate secrets).",
            code="secret_line_break",
        )
    bits = secret_bits(secret)
    if bits < SECRET_MIN_BITS:
        raise ValidationError(
            "This secret is too weak: about %(bits)d bits of entropy, at least %(min)d "
            "(32 random bytes) are needed, e.g. 43 characters of base64 or 64 hex digits "
            '(python -c "import secrets; print(secrets.token_urlsafe(32))").',
            code="secret_too_weak",
            params={"bits": int(bits), "min": SECRET_MIN_BITS},
        )


def validate_secrets(text: str) -> None:
    """The validator of ``secrets`` columns: every listed secret must be strong."""
    listed = split_secrets(text)
    if not listed:
        raise ValidationError("A secret is required.", code="required")
    problems: list[ValidationError] = []
    for n, secret in enumerate(listed, 1):
        try:
            validate_secret(secret)
        except ValidationError as exc:
            where = f"Secret {n} of {len(listed)}: " if len(listed) > 1 else ""
            problems.extend(
                ValidationError(where + str(message), code=exc.code) for message in exc.messages
            )
    if problems:
        raise ValidationError(problems)


# ---------------------------------------------------------------- source side


class Event(models.Model):
    """One change of one row, written in the transaction that made the change.

    ``position`` is its place in the feed, given after its transaction
    committed by the sequencer (``source/sequencer.py``): writers take no lock
    among themselves, and positions are gap-free and become visible in order,
    so a cursor never skips a late commit. ``id`` only records insertion order.
    """

    UPSERT = "upsert"
    DELETE = "delete"
    OPS = [(UPSERT, "upsert"), (DELETE, "delete")]

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    model = models.CharField(max_length=200, help_text="app_label.model_name")
    op = models.CharField(max_length=10, choices=OPS)
    key = models.JSONField(help_text="Natural key after the change.")
    old_key = models.JSONField(
        null=True,
        blank=True,
        help_text="Natural key before the change, when the change renamed it.",
    )
    data = models.JSONField(null=True, blank=True)
    changed = models.JSONField(null=True, blank=True, help_text="Names of the fields that changed.")
    position = models.BigIntegerField(
        null=True,
        blank=True,
        unique=True,
        help_text="Place in the feed, given once the event's transaction committed.",
    )
    # NULL, not "": writers that do not route (the PostgreSQL one-statement save, older
    # code, relays) leave the column out, and nothing to route is not "routed to none".
    routes = models.TextField(  # noqa: DJ001
        null=True,
        blank=True,
        help_text="For the Targets whose row filters read this model: what the event is "
        "to each (source/routes.py). Empty: no filter reads the model.",
    )

    class Meta:
        ordering = ["id"]
        verbose_name = "outbox event"

    def __str__(self) -> str:
        where = "unsequenced" if self.position is None else f"@{self.position}"
        return f"#{self.id} {where} {self.op} {self.model} {self.key}"


def new_source_id() -> str:
    """A source identity: 128 random bits in hex (32 characters)."""
    return _secrets.token_hex(16)


#: Longest source identity either side stores or accepts.
SOURCE_ID_MAX = 64


class OutboxState(models.Model):
    """A single row: the sequencer's lock and the last position it gave, how far
    the outbox was pruned, and the identity of this outbox (its positions mean
    something only together with it: a site recreated or replaced gets a new
    one, so its targets notice, as CouchDB's replication ids carry the server's
    UUID)."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    pruned_through = models.BigIntegerField(default=0)
    last_position = models.BigIntegerField(
        default=0, help_text="The last feed position given (the feed's head)."
    )
    source_id = models.CharField(
        max_length=SOURCE_ID_MAX,
        default=new_source_id,
        help_text="Identity of this outbox, sent with every feed page, snapshot and webhook.",
    )

    def __str__(self) -> str:
        return f"outbox pruned through {self.pruned_through}"


class Target(models.Model):
    """A site allowed to read this site's feed, with the secret it signs requests with."""

    name = models.CharField(max_length=100, unique=True, validators=[_name_validator])
    secrets = models.TextField(
        validators=[validate_secrets],
        help_text="Shared secret, one per line, each at least 32 random bytes. During a rotation "
        "keep the old one on a line above the new one; any listed secret is accepted.",
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_seen_seq = models.BigIntegerField(
        null=True, blank=True, help_text="Cursor of the target's latest feed request."
    )
    # Push (webhooks) ------------------------------------------------------
    webhook_url = models.URLField(
        max_length=500,
        blank=True,
        default="",
        help_text="The target's changefeed_sync webhook URL, e.g. "
        "https://staging.example.com/sync/webhook/production/. Empty: the target only pulls.",
    )
    model_labels = models.JSONField(
        "models",
        default=list,
        blank=True,
        help_text='Model labels this target receives, e.g. ["shop.country"]. Empty: all.',
    )
    row_filters = models.JSONField(
        default=dict,
        blank=True,
        help_text='Per model, the rows this target receives, as Django field lookups on '
        'registered fields, e.g. {"shop.country": {"code__in": ["fr", "be"]}}. Empty: every row.',
    )
    filters_route = models.CharField(
        max_length=16,
        blank=True,
        default="",
        editable=False,
        help_text="The route id of the row filters in effect (source/routes.py); empty: none.",
    )
    filters_position = models.BigIntegerField(
        default=0,
        editable=False,
        help_text="Feed position at which the row filters in effect were first seen: a "
        "cursor below it must start again with a full Data Pull.",
    )
    paused = models.BooleanField(
        default=False, help_text="Deliveries paused (the feed still answers)."
    )
    delivered_seq = models.BigIntegerField(
        default=0, help_text="Feed position up to which deliveries were accepted (or enqueued)."
    )
    last_delivery_at = models.DateTimeField(null=True, blank=True)
    failures = models.PositiveIntegerField(default=0, help_text="Consecutive failed deliveries.")
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    last_error_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def secret_list(self) -> list[str]:
        return split_secrets(self.secrets)

    def clean(self) -> None:
        from .filters import filter_problems, unreceived_problems

        problems = filter_problems(self.row_filters)
        problems += unreceived_problems(self.row_filters, self.allowed_models())
        if problems:
            raise ValidationError({"row_filters": problems})

    def allowed_models(self) -> list[str] | None:
        """The model labels this Target receives (lower case), or None for all."""
        labels = self.model_labels
        if not labels:
            return None
        if not isinstance(labels, list):
            return []  # not a list of labels (edited by hand): nothing, never everything
        return sorted({str(label).lower() for label in labels})


class Nonce(models.Model):
    """Nonces of accepted signed requests, kept until their signature expires (replay guard)."""

    value = models.CharField(max_length=64, unique=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.value


# ---------------------------------------------------------------- target side


class DataSource(models.Model):
    """A site this one pulls from (django-data-sync's "Data Source")."""

    name = models.CharField(
        max_length=100,
        unique=True,
        validators=[_name_validator],
        help_text="How this site names the source, e.g. 'production'.",
    )
    url = models.URLField(
        max_length=500,
        help_text="Base URL of the source's changefeed_sync urls, e.g. https://example.com/sync/",
    )
    client_name = models.CharField(
        max_length=100,
        validators=[_name_validator],
        help_text="The name of this site in the source's Targets.",
    )
    secrets = models.TextField(
        validators=[validate_secrets],
        help_text="Shared secret agreed with the source, one per line, each at least 32 random "
        "bytes; the last one signs.",
    )
    checkpoint = models.BigIntegerField(
        default=0, help_text="Feed position of the last applied event."
    )
    source_id = models.CharField(
        max_length=SOURCE_ID_MAX,
        blank=True,
        default="",
        help_text="Identity of the source the checkpoint belongs to, recorded by a full Data "
        "Pull or the first sync; a source answering with another one was reset or replaced.",
    )
    last_sync_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    last_error_at = models.DateTimeField(null=True, blank=True)
    oidc_service_account = models.EmailField(
        blank=True,
        default="",
        help_text="Set when the source delivers through Cloud Tasks: webhooks must then carry a "
        "Google OIDC token of this service account.",
    )
    oidc_audience = models.CharField(
        max_length=500,
        blank=True,
        default="",
        help_text="Expected audience; empty: the webhook URL.",
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "data source"

    def __str__(self) -> str:
        return self.name

    def secret_list(self) -> list[str]:
        return split_secrets(self.secrets)


class DataPull(models.Model):
    """One full copy of a source's registered data (django-data-sync's "Data Pull")."""

    PENDING, RUNNING, SUCCEEDED, FAILED = "pending", "running", "succeeded", "failed"
    STATUSES = [
        (PENDING, "pending"),
        (RUNNING, "running"),
        (SUCCEEDED, "succeeded"),
        (FAILED, "failed"),
    ]

    source = models.ForeignKey(DataSource, on_delete=models.CASCADE, related_name="pulls")
    status = models.CharField(max_length=10, choices=STATUSES, default=PENDING, db_index=True)
    dry_run = models.BooleanField(
        default=False, help_text="Preview: report what would change, write nothing."
    )
    keep_missing = models.BooleanField(
        default=False, help_text="Keep rows that the source does not have."
    )
    allow_mass_delete = models.BooleanField(
        default=False,
        help_text="Allow deleting more than half of a model's rows (e.g. the source is empty).",
    )
    counts = models.JSONField(
        default=dict, blank=True, help_text="Per model: created, updated, deleted, unchanged."
    )
    progress = models.CharField(max_length=200, blank=True, default="")
    position = models.BigIntegerField(
        null=True, blank=True, help_text="Feed position of the snapshot."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    runner = models.CharField(
        max_length=200, blank=True, default="", help_text="host:pid of the process running it."
    )
    heartbeat_at = models.DateTimeField(
        null=True, blank=True, help_text="Last sign of life of the process running it."
    )
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "data pull"

    def __str__(self) -> str:
        return f"{self.source} pull #{self.pk} ({self.status})"

    @property
    def duration(self) -> Any:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None
