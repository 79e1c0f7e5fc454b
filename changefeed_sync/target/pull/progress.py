"""What a running pull reports of itself, to the admin, the command and its heartbeat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """Where a running pull is: ``done`` of about ``total`` rows of model ``label``."""

    label: str
    done: int
    total: int
    model: int  # 1-based index of the model
    models: int
    phase: str = "read"  # read | relink | delete | done
    note: str = ""

    def __str__(self) -> str:
        if self.phase == "done":
            return "done" + (f"; {self.note}" if self.note else "")
        head = f"[{self.model}/{self.models}] {self.label}: "
        if self.phase == "read":
            return head + f"{self.done:,} of {self.total:,} rows"
        if self.phase == "relink":
            return head + f"{self.done:,} of {self.total:,} rows again, for references read late"
        return head + f"deleted {self.done:,} rows the source does not have"


ProgressCallback = Callable[[Progress], None]
