"""manage.py demo_setup: what example_pair/run does to a fresh site before starting it.

* ``--admin NAME``: a superuser NAME whose password is $EXAMPLE_PAIR_PASSWORD (created,
  or its password reset);
* ``--demo-data`` (source): the countries, languages and copies of demo/content.py;
* ``--target NAME`` (source): let the site NAME read this site's feed, signing with the
  shared secret $EXAMPLE_PAIR_SECRET;
* ``--data-source NAME --url URL --client-name NAME`` (target): pull from the source at
  URL, which knows this site as client-name, with the same shared secret.

Secrets come from the environment, not the command line, so that no process list shows
them. Running it again updates what exists (it is idempotent).
"""

from __future__ import annotations

import io
import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from changefeed_sync.models import DataSource, Target
from demo.content import COLOURS, COPIES, COUNTRIES, LANGUAGES
from demo.models import Copy, Country, Language


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CommandError(f"${name} is not set")
    return value


class Command(BaseCommand):
    help = "Prepare a demo site: admin user, demo data, Target or Data Source."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--admin", metavar="NAME", help="Superuser to create or reset.")
        parser.add_argument("--demo-data", action="store_true", help="Load the demo content.")
        parser.add_argument("--target", metavar="NAME", help="Target allowed to read the feed.")
        parser.add_argument("--data-source", metavar="NAME", help="Data Source to pull from.")
        parser.add_argument("--url", help="The Data Source's sync URL, e.g. http://…/sync/.")
        parser.add_argument("--client-name", help="This site's name in the source's Targets.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["admin"]:
            self._admin(options["admin"], _env("EXAMPLE_PAIR_PASSWORD"))
        if options["demo_data"]:
            self._demo_data()
        if options["target"]:
            target, _ = Target.objects.update_or_create(
                name=options["target"],
                defaults={"secrets": _env("EXAMPLE_PAIR_SECRET"), "active": True},
            )
            self.stdout.write(f"Target {target.name!r} may read this site's feed")
        if options["data_source"]:
            if not options["url"] or not options["client_name"]:
                raise CommandError("--data-source needs --url and --client-name")
            source, _ = DataSource.objects.update_or_create(
                name=options["data_source"],
                defaults={
                    "url": options["url"],
                    "client_name": options["client_name"],
                    "secrets": _env("EXAMPLE_PAIR_SECRET"),
                },
            )
            self.stdout.write(f"Data Source {source.name!r} at {source.url}")

    def _admin(self, username: str, password: str) -> None:
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        user.is_staff = user.is_superuser = user.is_active = True
        user.set_password(password)
        user.save()
        self.stdout.write(f"admin user {username!r} {'created' if created else 'updated'}")

    @transaction.atomic
    def _demo_data(self) -> None:
        """Create the demo rows, or put back their original text; untouched rows stay as
        they are (every save is a change the targets receive). The promotions that
        demo_edits adds are removed."""
        removed, _ = Copy.objects.filter(key__startswith="promo-").delete()
        saved = 0
        countries = {}
        for code, name in COUNTRIES.items():
            country = Country.objects.filter(code=code).first() or Country(code=code)
            saved += _save_if_changed(country, name=name)
            countries[code] = country
        languages = {}
        for country_code, code, name in LANGUAGES:
            country = countries[country_code]
            language = Language.objects.filter(country=country, code=code).first()
            language = language or Language(country=country, code=code)
            saved += _save_if_changed(language, name=name)
            languages[code] = language
        for key, texts in COPIES.items():
            for code, text in texts.items():
                language = languages[code]
                copy = Copy.objects.filter(language=language, key=key).first()
                copy = copy or Copy(language=language, key=key)
                if key == "welcome" and not copy.thumbnail:
                    country = language.country.code
                    copy.thumbnail.save(
                        f"{country}-{code}.png", _thumbnail(COLOURS[country]), save=False
                    )
                    copy.value = ""  # saved below, with the thumbnail
                saved += _save_if_changed(copy, value=text)
        self.stdout.write(
            f"demo data: {Country.objects.count()} countries, {Language.objects.count()} "
            f"languages, {Copy.objects.count()} copies ({saved} saved, {removed} removed)"
        )


def _save_if_changed(obj: Any, **values: Any) -> int:
    if obj.pk is not None and all(getattr(obj, k) == v for k, v in values.items()):
        return 0
    for name, value in values.items():
        setattr(obj, name, value)
    obj.save()
    return 1


def _thumbnail(colour: tuple[int, int, int]) -> ContentFile[bytes]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), colour).save(buffer, format="PNG")
    return ContentFile(buffer.getvalue())
