"""Source identity: the outbox's random id (every existing install gets one) and the
id a Data Source's checkpoint belongs to; cursors beyond the head recorded by older
versions (``feed/?since=`` was accepted beyond it) are forgotten."""

from django.db import migrations, models

import changefeed_sync.models


def _identify_outbox(apps, schema_editor):  # type: ignore[no-untyped-def]
    using = schema_editor.connection.alias
    state_model = apps.get_model("changefeed_sync", "OutboxState")
    # The row exists since 0001 unless the database was flushed; each install its own id
    # (AddField gave the existing row one, computed once: draw it here again, per row).
    state, _ = state_model.objects.using(using).get_or_create(id=1)
    state_model.objects.using(using).filter(id=1).update(
        source_id=changefeed_sync.models.new_source_id()
    )
    event_model = apps.get_model("changefeed_sync", "Event")
    head = max(
        event_model.objects.using(using).aggregate(m=models.Max("id"))["m"] or 0,
        state.pruned_through,
    )
    apps.get_model("changefeed_sync", "Target").objects.using(using).filter(
        last_seen_seq__gt=head
    ).update(last_seen_seq=None)


class Migration(migrations.Migration):
    dependencies = [
        ("changefeed_sync", "0004_secret_validation"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxstate",
            name="source_id",
            field=models.CharField(
                default=changefeed_sync.models.new_source_id,
                help_text="Identity of this outbox, sent with every feed page, snapshot and webhook.",
                max_length=64,
            ),
        ),
        migrations.AddField(
            model_name="datasource",
            name="source_id",
            field=models.CharField(
                blank=True,
                default="",
                help_text="Identity of the source the checkpoint belongs to, recorded by a full Data Pull or the first sync; a source answering with another one was reset or replaced.",
                max_length=64,
            ),
        ),
        migrations.RunPython(_identify_outbox, migrations.RunPython.noop),
    ]
