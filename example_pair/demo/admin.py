from django.contrib import admin

from .models import Copy, Country, Language


@admin.register(Country)
class CountryAdmin(admin.ModelAdmin):
    list_display = ["code", "name"]
    search_fields = ["code", "name"]


@admin.register(Language)
class LanguageAdmin(admin.ModelAdmin):
    list_display = ["country", "code", "name"]
    list_filter = ["country"]
    search_fields = ["code", "name", "country__code"]


@admin.register(Copy)
class CopyAdmin(admin.ModelAdmin):
    list_display = ["__str__", "value", "thumbnail"]
    list_filter = ["language__country", "language"]
    search_fields = ["key", "value", "language__code", "language__country__code"]
    list_select_related = ["language__country"]
