from django.conf import settings
from django.conf.urls.static import static
from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "Target site (receives the source's changes)"
admin.site.site_title = "target site"
admin.site.site_url = None  # the demo has no public pages: no "View site" link

urlpatterns = [
    path("admin/", admin.site.urls),
    path("sync/", include("changefeed_sync.urls")),
    *static(settings.MEDIA_URL, document_root=settings.MEDIA_ROOT),
]
