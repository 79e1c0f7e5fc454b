"""Full Data Pull: moved to ``changefeed_sync.target.pull``."""

# temporary: removed when the tree is reshaped
from .target.pull import MAX_DELETE_SHARE as MAX_DELETE_SHARE  # noqa: F401
from .target.pull import Progress as Progress  # noqa: F401
from .target.pull import ProgressCallback as ProgressCallback  # noqa: F401
from .target.pull import PullRefused as PullRefused  # noqa: F401
from .target.pull import execute as execute  # noqa: F401
from .target.pull import fail_stale_pulls as fail_stale_pulls  # noqa: F401
from .target.pull import run_pull as run_pull  # noqa: F401
from .target.pull import stale_reason as stale_reason  # noqa: F401
from .target.pull import start_in_background as start_in_background  # noqa: F401
from .target.pull import this_runner as this_runner  # noqa: F401
