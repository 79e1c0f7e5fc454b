"""Admin: Data Sources (target side), Targets and outbox events (source side).

Secrets are write-only: the form takes a new value and never renders the
stored one; leaving the field empty keeps it. A secret must carry 32 random
bytes (``models.validate_secret``); the form suggests a freshly generated one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import django
from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html

from .models import (
    DataPull,
    DataSource,
    Event,
    Target,
    generate_secret,
    split_secrets,
    validate_secret,
)

if TYPE_CHECKING:
    # django-stubs makes these generic; Django's classes take no subscript at run time.
    _ModelForm = forms.ModelForm[Any]
    _SourceAdmin = admin.ModelAdmin[DataSource]
    _TargetAdmin = admin.ModelAdmin[Target]
    _EventAdmin = admin.ModelAdmin[Event]
    _PullAdmin = admin.ModelAdmin[DataPull]
else:
    _ModelForm = forms.ModelForm
    _SourceAdmin = _TargetAdmin = _EventAdmin = _PullAdmin = admin.ModelAdmin


class _SecretForm(_ModelForm):
    """A write-only secret: one new secret per save, never rendered back.

    The field takes exactly one secret (spaces included: it is never split); to rotate,
    tick "keep the current secrets" and the new one is added after them (the last
    one signs). Every render suggests a freshly generated secret.
    """

    new_secrets = forms.CharField(
        label="Secret",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )
    keep_current_secrets = forms.BooleanField(
        label="Keep the current secrets",
        required=False,
        help_text="Rotation: the new secret is added after the current ones and signs from now "
        "on; the current ones stay accepted until you save a secret without this box ticked.",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep = "Leave empty to keep the current secret. " if self.instance.pk else ""
        # Not the stored secret: a new one for the operator to copy here and to the other site.
        self.fields["new_secrets"].help_text = format_html(
            "Write-only: never shown again. {}The same on both sites, at least 32 random "
            "bytes; spaces are part of it. Generated for this page, to copy here and to the "
            'other site: <code class="changefeed-generated-secret">{}</code>',
            keep,
            generate_secret(),
        )

    def clean_new_secrets(self) -> str:
        new: str = self.cleaned_data.get("new_secrets") or ""
        if new:
            validate_secret(new)
        return new

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        new = cleaned.get("new_secrets")
        if "new_secrets" in self.errors:
            return cleaned
        if not new and not (self.instance.pk and self.instance.secrets):
            self.add_error("new_secrets", "A secret is required.")
        elif not new and cleaned.get("keep_current_secrets"):
            self.add_error("new_secrets", "Enter the new secret to add to the current ones.")
        return cleaned

    def save(self, commit: bool = True) -> Any:
        new = self.cleaned_data.get("new_secrets")
        if new:
            kept = (
                [s for s in split_secrets(self.instance.secrets or "") if s != new]
                if self.cleaned_data.get("keep_current_secrets")
                else []
            )
            self.instance.secrets = "\n".join([*kept, new])
        return super().save(commit)


def _url_field(required: bool, label: str) -> forms.URLField:
    # The admin's own width class, and https as the default scheme on Django >= 5.
    extra: dict[str, Any] = {"assume_scheme": "https"} if django.VERSION >= (5, 0) else {}
    return forms.URLField(
        max_length=500,
        required=required,
        label=label,
        widget=forms.URLInput(attrs={"class": "vURLField"}),
        **extra,
    )


class DataSourceForm(_SecretForm):
    """Target side: where to pull from; OIDC fields only when the source uses Cloud Tasks."""

    url = _url_field(True, "URL")

    class Meta:
        model = DataSource
        fields = ["name", "url", "client_name", "oidc_service_account", "oidc_audience"]
        labels = {"oidc_service_account": "OIDC service account", "oidc_audience": "OIDC audience"}


def _model_choices() -> list[tuple[str, str]]:
    from . import registry

    return [(o.label, o.label) for o in sorted(registry.all_options(), key=lambda o: o.label)]


class TargetForm(_SecretForm):
    webhook_url = _url_field(False, "Webhook URL")
    model_labels = forms.MultipleChoiceField(
        label="Models",
        required=False,
        choices=_model_choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="Registered models this target receives; none ticked: all.",
    )

    class Meta:
        model = Target
        fields = ["name", "active", "webhook_url", "model_labels", "row_filters", "paused"]

    def clean_row_filters(self) -> Any:
        # An emptied box is "every row" ({}), not null, which the column does not take.
        value = self.cleaned_data.get("row_filters")
        return {} if value in (None, "") else value


@admin.register(DataSource)
class DataSourceAdmin(_SourceAdmin):
    form = DataSourceForm
    list_display = [
        "name",
        "url",
        "client_name",
        "checkpoint",
        "last_sync_at",
        "latest_pull",
        "last_error_short",
    ]
    search_fields = ["name", "url"]
    readonly_fields = ["checkpoint", "source_id", "last_sync_at", "last_error", "last_error_at"]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        secret = ["new_secrets"] if obj is None else ["new_secrets", "keep_current_secrets"]
        fieldsets: list[Any] = [(None, {"fields": ["name", *secret, "url", "client_name"]})]
        if obj is not None:
            fieldsets.append(("Status", {"fields": self.readonly_fields}))
        fieldsets.append(
            (
                "Cloud Tasks (OIDC)",
                {"fields": ["oidc_service_account", "oidc_audience"], "classes": ["collapse"]},
            )
        )
        return fieldsets

    @admin.display(description="latest pull")
    def latest_pull(self, obj: DataSource) -> str:
        pull = obj.pulls.order_by("-created_at").first()
        return f"#{pull.pk} {pull.status}" if pull else "never"

    @admin.display(description="last error")
    def last_error_short(self, obj: DataSource) -> str:
        return (obj.last_error[:80] + "…") if len(obj.last_error) > 80 else obj.last_error


@admin.register(Target)
class TargetAdmin(_TargetAdmin):
    form = TargetForm
    list_display = [
        "name",
        "active",
        "push_to",
        "paused",
        "delivered_seq",
        "last_seen_seq",
        "last_seen_at",
        "lag",
        "failures",
        "last_error_short",
    ]
    list_filter = ["active", "paused"]

    @admin.display(description="push to")
    def push_to(self, obj: Target) -> str:
        from urllib.parse import urlsplit

        return urlsplit(obj.webhook_url).netloc if obj.webhook_url else "pull only"

    search_fields = ["name", "webhook_url"]

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        secret = ["new_secrets"] if obj is None else ["new_secrets", "keep_current_secrets"]
        fieldsets: list[Any] = [
            (None, {"fields": ["name", *secret, "active"]}),
            ("What it receives", {"fields": ["model_labels", "row_filters"]}),
            ("Push", {"fields": ["webhook_url", "paused"]}),
        ]
        if obj is not None:
            fieldsets.append(("Status", {"fields": self.readonly_fields}))
        return fieldsets

    readonly_fields = [
        "created_at",
        "last_seen_at",
        "last_seen_seq",
        "delivered_seq",
        "last_delivery_at",
        "failures",
        "next_attempt_at",
        "last_error",
        "last_error_at",
        "lag",
    ]
    actions = ["retry_now", "pause", "resume"]

    @admin.display(description="lag")
    def lag(self, obj: Target) -> str:
        from .status import target_lag

        lag = target_lag(obj, obj._state.db or "default")
        return f"{lag.events} events, {lag.seconds:.0f} s"

    @admin.display(description="last error")
    def last_error_short(self, obj: Target) -> str:
        return (obj.last_error[:80] + "…") if len(obj.last_error) > 80 else obj.last_error

    @admin.action(description="Retry delivery now")
    def retry_now(self, request: HttpRequest, queryset: Any) -> None:
        from .source.push import retry_now

        retry_now(list(queryset))
        self.message_user(request, f"Deliveries scheduled for {queryset.count()} target(s).")

    @admin.action(description="Pause deliveries")
    def pause(self, request: HttpRequest, queryset: Any) -> None:
        queryset.update(paused=True)

    @admin.action(description="Resume deliveries")
    def resume(self, request: HttpRequest, queryset: Any) -> None:
        from .source.push import forget_targets, retry_now

        queryset.update(paused=False)
        forget_targets()
        retry_now(list(queryset))


@admin.register(Event)
class EventAdmin(_EventAdmin):
    # position: the feed's (empty for an instant, until the sequencer gives it);
    # id: insertion order only.
    list_display = ["position", "id", "created", "model", "op", "key", "changed"]
    list_filter = ["op", "model"]
    search_fields = ["key", "model"]
    readonly_fields = [
        "position", "id", "created_at", "model", "op", "key", "old_key", "data", "changed",
    ]  # fmt: skip
    ordering = ["-id"]

    @admin.display(description="created", ordering="created_at")
    def created(self, obj: Event) -> str:
        return timezone.localtime(obj.created_at).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]

    # The outbox is a log: editing or adding would lie to every target.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    # Deleting an unread event would lose a change silently; changefeed_prune
    # removes old ones and records it, so lagging targets get "cursor expired".
    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_search_results(self, request: HttpRequest, queryset: Any, search_term: str) -> Any:
        # JSON columns hold non-ASCII as \uXXXX on SQLite and MariaDB: search both forms.
        results, distinct = super().get_search_results(request, queryset, search_term)
        escaped = json.dumps(search_term)[1:-1]
        if escaped != search_term:
            more, more_distinct = super().get_search_results(request, queryset, escaped)
            results = results | more
            distinct = distinct or more_distinct
        return results, distinct


_PULL_OPTIONS = ["source", "dry_run", "keep_missing", "allow_mass_delete"]
_PULL_RESULTS = [
    "status",
    "counts",
    "progress",
    "position",
    "started_at",
    "finished_at",
    "runner",
    "heartbeat_at",
    "error",
]


@admin.register(DataPull)
class DataPullAdmin(_PullAdmin):
    list_display = ["id", "source", "status", "dry_run", "progress", "started_at", "finished_at"]
    list_filter = ["status", "source", "dry_run"]
    actions = ["rerun"]

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # Adding asks only for the options; an existing pull is a read-only record.
        return _PULL_OPTIONS if obj is None else [*_PULL_OPTIONS, *_PULL_RESULTS]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return [] if obj is None else [*_PULL_OPTIONS, *_PULL_RESULTS]

    # Before showing pulls, fail those whose runner died: none stays "running" forever.
    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        from .target.pull import fail_stale_pulls

        fail_stale_pulls(self.get_queryset(request).db)
        return super().changelist_view(request, extra_context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: Any = None
    ) -> Any:
        from .target.pull import fail_stale_pulls

        fail_stale_pulls(self.get_queryset(request).db)
        return super().change_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: DataPull, form: Any, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            self._start(obj)

    def _start(self, obj: DataPull) -> None:
        from .target.pull import start_in_background

        using = obj._state.db or "default"
        # After the admin's transaction commits: a failed pull must not
        # roll back its own record (django-data-sync lost it that way).
        transaction.on_commit(lambda: start_in_background(obj.pk, using), using=using)

    @admin.action(description="Re-run selected pulls", permissions=["add"])
    def rerun(self, request: HttpRequest, queryset: Any) -> None:
        from .target.pull import fail_stale_pulls

        fail_stale_pulls(queryset.db)
        started, skipped = [], []
        for old in queryset.select_related("source"):
            if old.status in (DataPull.PENDING, DataPull.RUNNING):
                skipped.append(f"#{old.pk}")
                continue
            new = DataPull.objects.using(queryset.db).create(
                source=old.source,
                dry_run=old.dry_run,
                keep_missing=old.keep_missing,
                allow_mass_delete=old.allow_mass_delete,
            )
            self._start(new)
            started.append(f"#{new.pk} (again #{old.pk})")
        if started:
            self.message_user(request, "Started pulls " + ", ".join(started) + ".")
        if skipped:
            self.message_user(
                request,
                "Not re-run, still pending or running: " + ", ".join(skipped) + ".",
                level=messages.WARNING,
            )
