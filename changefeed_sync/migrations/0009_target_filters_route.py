from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('changefeed_sync', '0008_event_routes'),
    ]

    operations = [
        migrations.AddField(
            model_name='target',
            name='filters_route',
            field=models.CharField(blank=True, default='', editable=False, help_text='The route id of the row filters in effect (source/routes.py); empty: none.', max_length=16),
        ),
        migrations.AddField(
            model_name='target',
            name='filters_position',
            field=models.BigIntegerField(default=0, editable=False, help_text='Feed position at which the row filters in effect were first seen: a cursor below it must start again with a full Data Pull.'),
        ),
    ]
