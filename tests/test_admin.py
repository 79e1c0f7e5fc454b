"""Admin: write-only secrets on Data Sources and Targets, a read-only outbox.

Driven through Django's test client as a superuser, like an operator would.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib import admin
from django.test import Client, RequestFactory
from django.urls import reverse

from changefeed_sync.models import DataSource, Event, Target, secret_bits
from tests.testapp.models import Copy, Country, Language

pytestmark = pytest.mark.django_db

SECRET = "s3cretQx7vLp2neverShownK9dW4mZ8tR1bY6hJ3fN0"  # 43 base64url characters: 258 bits
NEXT = "nextSecret9KdW2xq7Lm4Pz8Rt1Vb6Hy3Jf5Nc0Ga2Ue"


def html(response: Any) -> str:
    return response.content.decode()


# --------------------------------------------------------------------------- secrets

# (model, admin url name, the form's other fields, a field to change in the change form)
SECRET_MODELS = [
    pytest.param(
        DataSource,
        "datasource",
        {"name": "production", "url": "https://source.example/sync/", "client_name": "staging"},
        ("url", "https://other.example/sync/"),
        id="datasource",
    ),
    pytest.param(
        Target,
        "target",
        {"name": "staging", "active": "on"},
        ("name", "staging-2"),
        id="target",
    ),
]


def _add(client: Client, url_name: str, fields: dict[str, str], secret: str) -> Any:
    return client.post(
        reverse(f"admin:changefeed_sync_{url_name}_add"), {**fields, "new_secrets": secret}
    )


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_add_form_creates_with_a_secret(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    form = admin_client.get(reverse(f"admin:changefeed_sync_{url_name}_add"))
    assert form.status_code == 200
    assert 'name="new_secrets"' in html(form)
    assert 'type="password"' in html(form)

    response = _add(admin_client, url_name, fields, SECRET)
    assert response.status_code == 302, response.content.decode()[:2000]
    obj = model.objects.get(name=fields["name"])
    assert obj.secret_list() == [SECRET]


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_add_form_requires_a_secret(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    response = _add(admin_client, url_name, fields, "")
    assert response.status_code == 200
    assert "A secret is required." in html(response)
    assert not model.objects.exists()


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_stored_secret_is_never_rendered(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    _add(admin_client, url_name, fields, SECRET)
    obj = model.objects.get(name=fields["name"])
    pages = {
        "change form": reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk]),
        "changelist": reverse(f"admin:changefeed_sync_{url_name}_changelist"),
        "history": reverse(f"admin:changefeed_sync_{url_name}_history", args=[obj.pk]),
        "delete confirmation": reverse(f"admin:changefeed_sync_{url_name}_delete", args=[obj.pk]),
    }
    for page, url in pages.items():
        response = admin_client.get(url)
        assert response.status_code == 200, page
        assert fields["name"] in html(response), page  # the page really shows the object
        assert SECRET not in html(response), f"secret rendered on the {page}"
        assert SECRET[:8] not in html(response), f"part of the secret rendered on the {page}"


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_secret_typed_into_an_invalid_form_is_not_echoed(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    typed = "typed-but-rejected-Zr81-Qm7Wp3Xk9Lb5Vt2Hn8Dy4"
    response = _add(admin_client, url_name, {**fields, "name": "has spaces!"}, typed)
    assert response.status_code == 200
    assert "errornote" in html(response)
    assert typed not in html(response)
    assert not model.objects.exists()


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_empty_secret_on_change_keeps_the_old_one(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    _add(admin_client, url_name, fields, SECRET)
    obj = model.objects.get(name=fields["name"])
    field, value = change
    response = admin_client.post(
        reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk]),
        {**fields, field: value, "new_secrets": ""},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    obj.refresh_from_db()
    assert getattr(obj, field) == value  # the save happened
    assert obj.secret_list() == [SECRET]


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_two_secrets_rotate(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    _add(admin_client, url_name, fields, SECRET)
    obj = model.objects.get(name=fields["name"])
    change_url = reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk])

    response = admin_client.post(
        change_url, {**fields, "new_secrets": NEXT, "keep_current_secrets": "on"}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    obj.refresh_from_db()
    assert obj.secret_list() == [SECRET, NEXT]  # the last one signs

    page = html(admin_client.get(change_url))
    assert SECRET not in page and NEXT not in page

    # Entering the current one again while keeping the others moves it last, once.
    response = admin_client.post(
        change_url, {**fields, "new_secrets": SECRET, "keep_current_secrets": "on"}
    )
    assert response.status_code == 302
    obj.refresh_from_db()
    assert obj.secret_list() == [NEXT, SECRET]

    # Rotation done: enter the new one alone and the old one stops being valid.
    response = admin_client.post(change_url, {**fields, "new_secrets": NEXT})
    assert response.status_code == 302
    obj.refresh_from_db()
    assert obj.secret_list() == [NEXT]


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_keeping_the_current_secrets_needs_a_new_one(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    _add(admin_client, url_name, fields, SECRET)
    obj = model.objects.get(name=fields["name"])
    change_url = reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk])
    response = admin_client.post(
        change_url, {**fields, "new_secrets": "", "keep_current_secrets": "on"}
    )
    assert response.status_code == 200
    assert "Enter the new secret to add to the current ones." in html(response)
    obj.refresh_from_db()
    assert obj.secret_list() == [SECRET]


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_a_secret_with_spaces_is_one_secret(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    """The form used to split its input on whitespace: "a b c" became three secrets,
    each accepted alone. Spaces are now part of the secret."""
    phrase = f"  {SECRET[:22]} {SECRET[22:]} {NEXT[:20]}  "
    response = _add(admin_client, url_name, fields, phrase)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert model.objects.get(name=fields["name"]).secret_list() == [phrase.strip()]


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
@pytest.mark.parametrize(
    "weak",
    ["x", "test-secret", "s3cret-Qx7vLp2-never-shown", "aaaaaaaaaa" * 10, "short one two"],
)
def test_weak_secret_is_refused_and_not_echoed(
    admin_client: Client,
    model: Any,
    url_name: str,
    fields: dict[str, str],
    change: Any,
    weak: str,
) -> None:
    response = _add(admin_client, url_name, fields, weak)
    assert response.status_code == 200
    page = html(response)
    assert "This secret is too weak" in page
    assert f'value="{weak}"' not in page
    assert not model.objects.exists()

    _add(admin_client, url_name, fields, SECRET)
    obj = model.objects.get(name=fields["name"])
    change_url = reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk])
    for keep in ("", "on"):
        response = admin_client.post(
            change_url, {**fields, "new_secrets": weak, "keep_current_secrets": keep}
        )
        assert response.status_code == 200
        assert "This secret is too weak" in html(response)
    obj.refresh_from_db()
    assert obj.secret_list() == [SECRET]


def _suggested(response: Any) -> str:
    found = re.findall(r'<code class="changefeed-generated-secret">([^<]*)</code>', html(response))
    assert len(found) == 1, html(response)[:3000]
    return str(found[0])


@pytest.mark.parametrize(("model", "url_name", "fields", "change"), SECRET_MODELS)
def test_forms_suggest_a_freshly_generated_secret(
    admin_client: Client, model: Any, url_name: str, fields: dict[str, str], change: Any
) -> None:
    add_url = reverse(f"admin:changefeed_sync_{url_name}_add")
    first, second = _suggested(admin_client.get(add_url)), _suggested(admin_client.get(add_url))
    assert first != second  # generated per page, never a fixed default
    assert len(first) == 43 and secret_bits(first) >= 256

    # The operator copies it into the field (and to the other site).
    response = _add(admin_client, url_name, fields, first)
    assert response.status_code == 302, response.content.decode()[:2000]
    obj = model.objects.get(name=fields["name"])
    assert obj.secret_list() == [first]

    # The change form suggests a new one, never the stored one.
    change_page = admin_client.get(
        reverse(f"admin:changefeed_sync_{url_name}_change", args=[obj.pk])
    )
    assert _suggested(change_page) != first
    assert first not in html(change_page)
    assert 'name="keep_current_secrets"' in html(change_page)
    assert 'name="keep_current_secrets"' not in html(admin_client.get(add_url))


# --------------------------------------------------------------------------- row filters


def _target_fields(**fields: Any) -> dict[str, Any]:
    return {"name": "regional", "active": "on", "new_secrets": SECRET, **fields}


def test_target_form_shows_and_saves_row_filters(admin_client: Client) -> None:
    form = admin_client.get(reverse("admin:changefeed_sync_target_add"))
    assert 'name="row_filters"' in html(form)
    filters = '{"testapp.country": {"code__in": ["fr", "be"]}}'
    response = admin_client.post(
        reverse("admin:changefeed_sync_target_add"), _target_fields(row_filters=filters)
    )
    assert response.status_code == 302, html(response)[:2000]
    target = Target.objects.get(name="regional")
    assert target.row_filters == {"testapp.country": {"code__in": ["fr", "be"]}}
    change = admin_client.get(reverse("admin:changefeed_sync_target_change", args=[target.pk]))
    assert "code__in" in html(change)
    # Emptied: every row again, not a null the column refuses.
    response = admin_client.post(
        reverse("admin:changefeed_sync_target_change", args=[target.pk]),
        {"name": "regional", "active": "on", "row_filters": ""},
    )
    assert response.status_code == 302, html(response)[:2000]
    target.refresh_from_db()
    assert target.row_filters == {}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"row_filters": '{"testapp.country": {"nope": 1}}'}, "testapp.country has no field"),
        (
            {
                "row_filters": '{"testapp.copy": {"key": "title"}}',
                "model_labels": ["testapp.country"],
            },
            "this Target does not receive testapp.copy",
        ),
    ],
)
def test_target_form_shows_the_filters_problems_on_the_field(
    admin_client: Client, fields: dict[str, Any], words: str
) -> None:
    response = admin_client.post(
        reverse("admin:changefeed_sync_target_add"), _target_fields(**fields)
    )
    assert response.status_code == 200
    # On the row_filters field, not at the form's top.
    errors = response.context["adminform"].form.errors
    assert set(errors) == {"row_filters"}, errors
    assert any(words in message for message in errors["row_filters"]), errors
    assert 'id="id_row_filters_error"' in html(response) or "errorlist" in html(response)
    assert not Target.objects.exists()


# --------------------------------------------------------------------------- outbox events


def _some_events() -> list[Event]:
    fr = Country.objects.create(code="fr", name="France")
    lang = Language.objects.create(country=fr, code="fr", name="French")
    Copy.objects.create(language=lang, key="greeting.hello", value="Bonjour")
    Country.objects.create(code="de", name="Germany")
    return list(Event.objects.order_by("id"))


def test_event_changelist_lists_events_and_offers_no_add(admin_client: Client) -> None:
    events = _some_events()
    assert len(events) == 4
    response = admin_client.get(reverse("admin:changefeed_sync_event_changelist"))
    assert response.status_code == 200
    page = html(response)
    for event in events:
        assert reverse("admin:changefeed_sync_event_change", args=[event.pk]) in page
    assert "testapp.copy" in page
    assert reverse("admin:changefeed_sync_event_add") not in page


def test_event_add_view_is_forbidden(admin_client: Client) -> None:
    url = reverse("admin:changefeed_sync_event_add")
    assert admin_client.get(url).status_code == 403
    response = admin_client.post(
        url, {"model": "testapp.country", "op": "upsert", "key": '["xx"]', "data": "{}"}
    )
    assert response.status_code == 403
    assert not Event.objects.exists()


def test_event_change_view_is_read_only(admin_client: Client) -> None:
    event = _some_events()[0]
    url = reverse("admin:changefeed_sync_event_change", args=[event.pk])
    response = admin_client.get(url)
    assert response.status_code == 200
    page = html(response)
    assert "testapp.country" in page
    assert 'name="_save"' not in page
    assert 'name="key"' not in page  # shown as text, not as an input

    response = admin_client.post(
        url, {"model": "testapp.tampered", "op": "delete", "key": '["zz"]', "_save": "Save"}
    )
    assert response.status_code == 403
    after = Event.objects.get(pk=event.pk)
    assert (after.model, after.op, after.key, after.data) == (
        event.model,
        event.op,
        event.key,
        event.data,
    )


def test_event_cannot_be_deleted_from_the_admin(admin_client: Client) -> None:
    """Deleting an undelivered event loses a change for every target, silently:
    the outbox is a log, like adding or editing it would lie to every target."""
    events = _some_events()
    response = admin_client.post(
        reverse("admin:changefeed_sync_event_delete", args=[events[0].pk]), {"post": "yes"}
    )
    assert response.status_code == 403
    response = admin_client.post(
        reverse("admin:changefeed_sync_event_changelist"),
        {"action": "delete_selected", "_selected_action": [e.pk for e in events], "post": "yes"},
    )
    assert Event.objects.count() == len(events)


def _search(client: Client, q: str) -> list[int]:
    response = client.get(reverse("admin:changefeed_sync_event_changelist"), {"q": q})
    assert response.status_code == 200
    return sorted(obj.pk for obj in response.context["cl"].result_list)


def test_event_search_by_natural_key_text(admin_client: Client) -> None:
    country_fr, language_fr, copy, country_de = _some_events()
    assert _search(admin_client, "greeting.hello") == [copy.pk]
    assert _search(admin_client, "Greeting") == [copy.pk]  # case-insensitive
    assert _search(admin_client, "de") == [country_de.pk]
    assert _search(admin_client, "fr") == sorted([country_fr.pk, language_fr.pk, copy.pk])
    assert _search(admin_client, "testapp.language") == [language_fr.pk]
    assert _search(admin_client, "nothing-like-this") == []


def _non_ascii_events(alias: str) -> Event:
    Country.objects.using(alias).create(code="fr", name="France")
    es = Country.objects.using(alias).create(code="es", name="Spain")
    lang = Language.objects.using(alias).create(country=es, code="ca", name="Català")
    Copy.objects.using(alias).create(language=lang, key="menú.café", value="Cafè")
    copy_event = Event.objects.using(alias).get(model="testapp.copy")
    assert copy_event.key == ["es", "ca", "menú.café"]
    return copy_event


def test_event_search_by_non_ascii_natural_key(admin_client: Client) -> None:
    """Natural keys are often words: an operator searching for one types it as it is."""
    copy_event = _non_ascii_events("default")
    assert _search(admin_client, "café") == [copy_event.pk]


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("term", ["greeting.hello", "menú.café"])
def test_event_admin_search_on_every_backend(db_alias: str, rf: RequestFactory, term: str) -> None:
    """The admin's search, run on each database's outbox (the client above only sees "default")."""
    copy_event = _non_ascii_events(db_alias)
    lang = Language.objects.using(db_alias).get(code="ca")
    Copy.objects.using(db_alias).create(language=lang, key="greeting.hello")
    hello_event = Event.objects.using(db_alias).get(model="testapp.copy", key__icontains="hello")
    expected = {"greeting.hello": hello_event.pk, "menú.café": copy_event.pk}[term]

    event_admin = admin.site._registry[Event]
    queryset, _ = event_admin.get_search_results(rf.get("/"), Event.objects.using(db_alias), term)
    assert sorted(e.pk for e in queryset) == [expected]
