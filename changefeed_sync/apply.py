"""Applying feed events on the target: moved to ``changefeed_sync.target.apply``."""

# temporary: removed when the tree is reshaped
from .target.apply import ApplyStats as ApplyStats  # noqa: F401
from .target.apply import apply_events as apply_events  # noqa: F401
from .target.apply import apply_page as apply_page  # noqa: F401
from .target.apply import is_relay as is_relay  # noqa: F401
from .target.apply import refused as refused  # noqa: F401
