from __future__ import annotations

from django.db import models

import changefeed_sync


@changefeed_sync.register_model(natural_key=["code"])
class Country(models.Model):
    code = models.CharField(max_length=2, unique=True)
    name = models.CharField(max_length=100, default="")

    def __str__(self) -> str:
        return self.code


@changefeed_sync.register_model(natural_key=["country.code", "code"])
class Language(models.Model):
    country = models.ForeignKey(Country, on_delete=models.CASCADE, related_name="languages")
    code = models.CharField(max_length=2)
    name = models.CharField(max_length=100, default="")

    class Meta:
        unique_together = [("country", "code")]


@changefeed_sync.register_model(
    natural_key=["language.country.code", "language.code", "key"],
    fields=("value", "key", "language", "tags"),
)
class Copy(models.Model):
    language = models.ForeignKey(Language, on_delete=models.CASCADE, related_name="copies")
    key = models.CharField(max_length=255)
    value = models.TextField(default="")
    default = models.TextField(default="", help_text="not synced (not in fields=)")
    tags = models.ManyToManyField("Tag", blank=True, related_name="copies")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["language", "key"], name="copy_lang_key")]


@changefeed_sync.register_model(natural_key=["slug"])
class Tag(models.Model):
    slug = models.SlugField(unique=True)


@changefeed_sync.register_model(natural_key=["slug"])
class Category(models.Model):
    """Self-referencing foreign key."""

    slug = models.SlugField(unique=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE)


class Plain(models.Model):
    """Same shape as Country, never registered (capture overhead baseline)."""

    code = models.CharField(max_length=2, unique=True)
    name = models.CharField(max_length=100, default="")


class Kinds(models.Model):
    """Every standard field type (registered in tests that need it)."""

    slug = models.SlugField(unique=True)
    big = models.BigIntegerField(null=True)
    dec = models.DecimalField(max_digits=20, decimal_places=6, null=True)
    when = models.DateTimeField(null=True)
    day = models.DateField(null=True)
    uid = models.UUIDField(null=True)
    blob = models.BinaryField(null=True)
    doc = models.JSONField(null=True)
    flag = models.BooleanField(default=False)
    ratio = models.FloatField(null=True)
    span = models.DurationField(null=True)
    color = models.CharField(max_length=5, choices=[("red", "Red"), ("blue", "Blue")], default="red")


changefeed_sync.register(Kinds, natural_key=["slug"])


class Document(models.Model):
    """A file field; registered with ``file_fields=["attachment"]`` by the tests that need it."""

    slug = models.SlugField(unique=True)
    attachment = models.FileField(upload_to="docs/", blank=True, max_length=200)


# An atlas of reference data, shaped as users' real ones are: rows that point at each
# other (a nation's capital region is one of its regions), unique fields that are not
# the natural key (alpha-3 and numeric codes, swapped and reused between rows), a
# self-reference and a many-to-many field.


@changefeed_sync.register_model(natural_key=["code"])
class Nation(models.Model):
    code = models.CharField(max_length=8, unique=True)
    alpha_3 = models.CharField(max_length=8, unique=True)
    numeric = models.IntegerField(unique=True, null=True, blank=True)
    name = models.CharField(max_length=100, default="")
    capital_region = models.ForeignKey(
        "Region", null=True, blank=True, on_delete=models.SET_NULL, related_name="capital_of"
    )
    neighbours = models.ManyToManyField("self", symmetrical=False, blank=True)

    def __str__(self) -> str:
        return self.code


@changefeed_sync.register_model(natural_key=["nation.code", "code"])
class Region(models.Model):
    nation = models.ForeignKey(Nation, on_delete=models.CASCADE, related_name="regions")
    code = models.CharField(max_length=8)
    name = models.CharField(max_length=100, default="")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children"
    )

    class Meta:
        unique_together = [("nation", "code")]
