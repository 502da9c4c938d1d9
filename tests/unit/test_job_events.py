"""JobEvents' end listeners (a runner stops the engine of a job ended by any process): called for
a job that surely ended, not for one found ended or taken back, whose next attempt may run."""

from __future__ import annotations

from dreamserve.events import JobEvents


def test_end_listeners_hear_sure_ends_only() -> None:
    events = JobEvents()
    heard: list[str] = []
    events.on_end(heard.append)
    events.publish(["progressed"], ended=False)
    events.publish(["taken-back"], ended=True, surely=False)  # JobStore.seen_ended
    events.publish(["cancelled"], ended=True)
    assert heard == ["cancelled"]
