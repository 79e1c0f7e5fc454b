"""Moved to target/increment_files.py. The names other modules still import from here."""

# temporary: removed when the tree is reshaped

from __future__ import annotations

from .target.increment_files import apply_with_files as apply_with_files
from .target.increment_files import kept_dir as kept_dir
from .target.increment_files import references as references
