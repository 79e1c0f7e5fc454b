from __future__ import annotations

from django.urls import path

from .source import views
from .target.views import webhook_view

app_name = "changefeed_sync"

urlpatterns = [
    path("feed/", views.feed_view, name="feed"),
    path("snapshot/", views.snapshot_view, name="snapshot"),
    path("files/", views.file_view, name="files"),
    path("webhook/<str:source_name>/", webhook_view, name="webhook"),
]
