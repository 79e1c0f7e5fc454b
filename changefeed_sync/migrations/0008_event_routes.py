from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('changefeed_sync', '0007_row_filters'),
    ]

    operations = [
        migrations.AddField(
            model_name='event',
            name='routes',
            field=models.TextField(blank=True, help_text="For the Targets whose row filters read this model: what the event is to each (source/routes.py). Empty: no filter reads the model.", null=True),
        ),
    ]
