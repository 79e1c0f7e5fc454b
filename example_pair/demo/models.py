"""The models of django-data-sync's README, registered with changefeed_sync.

Both sites install this app: the source edits these rows, the target receives them.
Primary keys may differ between the sites; rows are matched by natural key.
"""

from __future__ import annotations

from django.db import models

import changefeed_sync


@changefeed_sync.register_model(natural_key=["code"])
class Country(models.Model):
    code = models.CharField(max_length=2, unique=True)
    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["code"]
        verbose_name_plural = "countries"

    def __str__(self) -> str:
        return self.name


@changefeed_sync.register_model(natural_key=["country.code", "code"])
class Language(models.Model):
    country = models.ForeignKey(Country, on_delete=models.CASCADE, related_name="languages")
    code = models.CharField(max_length=2)
    name = models.CharField(max_length=100)

    class Meta:
        ordering = ["country__code", "code"]
        unique_together = [("country", "code")]

    def __str__(self) -> str:
        return f"{self.name} ({self.country.code})"


@changefeed_sync.register_model(
    natural_key=["language.country.code", "language.code", "key"],
    # The thumbnail's file is not transferred yet, only its name would be: not synced.
    exclude=["thumbnail"],
)
class Copy(models.Model):
    """A translated text of the site, e.g. the welcome message in French."""

    language = models.ForeignKey(Language, on_delete=models.CASCADE, related_name="copies")
    key = models.CharField(max_length=255)
    value = models.TextField()
    thumbnail = models.ImageField(upload_to="thumbnails/", blank=True)

    class Meta:
        ordering = ["language__country__code", "language__code", "key"]
        verbose_name_plural = "copies"
        constraints = [
            models.UniqueConstraint(fields=["language", "key"], name="demo_copy_language_key")
        ]

    def __str__(self) -> str:
        return f"{self.language.country.code}/{self.language.code}/{self.key}"
