"""Feed positions given by a sequencer after commit, instead of by a lock among writers.

Existing events keep their id as their position, so every target's checkpoint (a
position) stays valid; the sequencer continues from the highest of them.
"""

from django.db import migrations, models


def _positions_from_ids(apps, schema_editor):  # type: ignore[no-untyped-def]
    using = schema_editor.connection.alias
    event_model = apps.get_model("changefeed_sync", "Event")
    state_model = apps.get_model("changefeed_sync", "OutboxState")
    event_model.objects.using(using).update(position=models.F("id"))
    newest = event_model.objects.using(using).aggregate(m=models.Max("id"))["m"] or 0
    state, _ = state_model.objects.using(using).get_or_create(id=1)
    state_model.objects.using(using).filter(id=1).update(
        last_position=max(newest, state.pruned_through)
    )


def _ids_from_positions(apps, schema_editor):  # type: ignore[no-untyped-def]
    # Going back: before this migration the id was the position. Events inserted
    # since were sequenced in id order, so ids are already in feed order; only
    # their values may differ from their positions, which the older code cannot
    # represent: refuse rather than hand targets positions that change meaning.
    using = schema_editor.connection.alias
    event_model = apps.get_model("changefeed_sync", "Event")
    differ = event_model.objects.using(using).exclude(position=models.F("id"))
    if differ.exists():
        raise RuntimeError(
            "changefeed_sync: events written since 0006 have positions that differ from "
            "their ids; unapplying would change their feed positions. Prune them "
            "(changefeed_prune) or give the outbox a new identity first."
        )


class Migration(migrations.Migration):
    dependencies = [
        ("changefeed_sync", "0005_source_identity"),
    ]

    operations = [
        migrations.AddField(
            model_name="event",
            name="position",
            field=models.BigIntegerField(
                blank=True,
                help_text="Place in the feed, given once the event's transaction committed.",
                null=True,
                unique=True,
            ),
        ),
        migrations.AddField(
            model_name="outboxstate",
            name="last_position",
            field=models.BigIntegerField(
                default=0, help_text="The last feed position given (the feed's head)."
            ),
        ),
        migrations.RunPython(_positions_from_ids, _ids_from_positions),
    ]
