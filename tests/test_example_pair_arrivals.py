"""The demo's watcher (example_pair/pair.py, ``Arrivals``) matches the source's edits with
the target's changes in whichever order the two processes report them.

``example_pair/run --interval 1`` once stopped after 8.5 minutes with "edit 469 has not
reached the target after 30 s" although it had: the target's line came before the
source's and was never matched later. Plain logic, no processes: the messages are those
``demo_edits`` and ``demo_watch`` print.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.servers import REPO_ROOT


def _pair_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "example_pair_pair", REPO_ROOT / "example_pair" / "pair.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pair = _pair_module()
T0 = 1_000_000.0


def _edit(n: int, key: str, name: str | None, t: float) -> dict[str, Any]:
    """What demo_edits prints: a rename of a copy's text, or (name None) its delete."""
    if name is None:
        expect = {"model": "demo.copy", "key": [key], "deleted": True}
    else:
        expect = {"model": "demo.copy", "key": [key], "data": {"text": name}}
    return {"n": n, "t": t, "text": f"edit {n}", "expect": [expect]}


def _seen(key: str, name: str | None, t: float) -> dict[str, Any]:
    """What demo_watch prints when a row changed on the target."""
    if name is None:
        return {"t": t, "model": "demo.copy", "key": [key], "deleted": True}
    return {"t": t, "model": "demo.copy", "key": [key], "data": {"text": name}}


def test_the_target_reported_first_counts() -> None:
    arrivals = pair.Arrivals()
    said = arrivals.seen(_seen("k1", "hello", T0 + 0.01))
    assert "changed" in said[0]  # nothing to match yet
    said = arrivals.edit(_edit(469, "k1", "hello", T0))
    assert arrivals.pending == []
    assert said[0].endswith("edit 469")
    assert "target  edit 469" in said[1] and "(+0.01 s)" in said[1]
    assert arrivals.late(T0 + 60) is None


def test_in_order_as_before() -> None:
    arrivals = pair.Arrivals()
    arrivals.edit(_edit(1, "k1", "a", T0))
    assert arrivals.late(T0 + 31)["n"] == 1  # not arrived: late after 30 s
    said = arrivals.seen(_seen("k1", "a", T0 + 0.2))
    assert "target  edit   1" in said[0] and arrivals.pending == []


def test_an_old_state_of_the_row_does_not_count() -> None:
    """The target saw 'a', then 'b'; an edit back to 'a' has not arrived yet."""
    arrivals = pair.Arrivals()
    arrivals.seen(_seen("k1", "a", T0))
    arrivals.seen(_seen("k1", "b", T0 + 1))
    arrivals.edit(_edit(3, "k1", "a", T0 + 2))
    assert [e["n"] for e in arrivals.pending] == [3]
    arrivals.seen(_seen("k1", "a", T0 + 2.1))
    assert arrivals.pending == []


def test_a_missing_arrival_is_still_late() -> None:
    arrivals = pair.Arrivals()
    arrivals.seen(_seen("k2", "x", T0))  # another row
    arrivals.edit(_edit(7, "k1", None, T0))
    late = arrivals.late(T0 + 30.5)
    assert late is not None and late["n"] == 7 and late["key"] == ["k1"]


@settings(max_examples=200, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["k1", "k2", "k3"]), st.sampled_from(["a", "b", "c", None])),
        min_size=1,
        max_size=12,
    ),
    st.randoms(use_true_random=False),
)
def test_every_edit_arrives_whatever_the_order_of_the_reports(
    edits: list[tuple[str, str | None]], random: Any
) -> None:
    """Each edit is applied on the target (which reports its row's new state); the two
    processes' lines are interleaved at random, each keeping its own order. Every edit
    counts as arrived at the end, whatever the interleaving."""
    source = [("edits", _edit(n, key, name, T0 + n)) for n, (key, name) in enumerate(edits, 1)]
    target = [("watch", _seen(key, name, T0 + n + 0.5)) for n, (key, name) in enumerate(edits, 1)]
    merged = []
    while source or target:
        side = source if (source and (not target or random.random() < 0.5)) else target
        merged.append(side.pop(0))
    arrivals = pair.Arrivals()
    for who, message in merged:
        (arrivals.edit if who == "edits" else arrivals.seen)(message)
    assert arrivals.pending == [], merged
    assert arrivals.made == len(edits)
