from __future__ import annotations

from django.apps import AppConfig


class ChangefeedSyncConfig(AppConfig):
    name = "changefeed_sync"
    verbose_name = "Changefeed sync"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)

        capture_registered_models()
        wake_readers_on_commit()
        resume_deliveries_on_first_request()
        reread_changed_settings()
        reread_targets_when_saved()


def capture_registered_models() -> None:
    """Hook the models registered so far (decorators run at import) and those
    registered later; wrap bulk_create/bulk_update/update, which send no signals."""
    from . import registry
    from .source import capture, capture_bulk

    if capture.connect not in registry._on_register:
        registry._on_register.append(capture.connect)
        registry._on_unregister.append(capture.disconnect)
    for options in registry.all_options():
        capture.connect(options)
    capture_bulk.install_queryset_capture()


def wake_readers_on_commit() -> None:
    """Committed events wake this process's long-polls and schedule push deliveries."""
    from .signals import events_committed
    from .source import notifier, push

    events_committed.connect(notifier.on_events_committed, dispatch_uid="changefeed_notifier")
    events_committed.connect(push.on_events_committed, dispatch_uid="changefeed_push")


def resume_deliveries_on_first_request() -> None:
    """A restarted server resumes the deliveries its predecessor left pending."""
    from django.core.signals import request_started

    from .source import push

    request_started.connect(push.resume_on_first_request, dispatch_uid="changefeed_resume")


def reread_changed_settings() -> None:
    """Settings are read once and kept (conf.get); a changed one is read again."""
    from django.core.signals import setting_changed

    from . import conf

    setting_changed.connect(conf.forget, dispatch_uid="changefeed_settings")


def reread_targets_when_saved() -> None:
    """Capture routes events by the Targets' filters, kept a second (source/routes.py):
    a Target saved or deleted in this process is read again at the next write."""
    from django.db.models.signals import post_delete, post_save

    from .models import Target
    from .source import routes

    def forget(**kwargs: object) -> None:
        routes.forget()

    post_save.connect(forget, sender=Target, dispatch_uid="changefeed_routes", weak=False)
    post_delete.connect(forget, sender=Target, dispatch_uid="changefeed_routes", weak=False)
    # What a filter may read depends on the registered models too.
    from . import registry

    for hooks in (registry._on_register, registry._on_unregister):
        if routes.forget not in hooks:
            hooks.append(routes.forget)
