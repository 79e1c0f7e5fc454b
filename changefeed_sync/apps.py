from __future__ import annotations

from django.apps import AppConfig


class ChangefeedSyncConfig(AppConfig):
    name = "changefeed_sync"
    verbose_name = "Changefeed sync"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import (
            capture,
            checks,  # noqa: F401  (registers the system checks)
            registry,
        )

        # Models registered before ready() (decorators at import) are hooked
        # now; later registrations are hooked as they happen.
        if capture.connect not in registry._on_register:
            registry._on_register.append(capture.connect)
            registry._on_unregister.append(capture.disconnect)
        for options in registry.all_options():
            capture.connect(options)
        # bulk_create/bulk_update/update send no signals: wrap them once.
        capture.install_queryset_capture()
        # A restarted server resumes deliveries that its predecessor left pending.
        from django.core.signals import request_started

        from . import push

        request_started.connect(push.resume_on_first_request, dispatch_uid="changefeed_resume")
        # Settings are read once and kept (conf.get); a changed one is read again.
        from django.core.signals import setting_changed

        from . import conf

        setting_changed.connect(conf.forget, dispatch_uid="changefeed_settings")
