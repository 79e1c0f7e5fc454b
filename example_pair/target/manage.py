#!/usr/bin/env python
"""manage.py of the demo's target site: python example_pair/target/manage.py COMMAND"""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    # example_pair/ holds both sites and the app they share.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "target.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
