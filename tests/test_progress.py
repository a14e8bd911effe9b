"""Progress reports: throttled, with a final report, and readable numbers."""

from __future__ import annotations

import pytest
from onemarket import driverlog, progress
from onemarket.progress import Progress, ProgressEvent, human_bytes, log_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    return c


def test_updates_are_throttled_and_finish_always_reports(clock: Clock) -> None:
    events: list[ProgressEvent] = []
    p = Progress(10_000, events.append, interval_s=5.0)
    for _ in range(10):
        clock.now += 1.0
        p.update(1000)
    assert [e.done_bytes for e in events] == [5000, 10_000]
    assert not any(e.final for e in events)
    p.finish()
    assert events[-1].final and events[-1].done_bytes == 10_000
    assert events[-1].elapsed_s == pytest.approx(10.0)
    assert p.done_bytes == 10_000


def test_no_callback_still_counts(clock: Clock) -> None:
    p = Progress(None, None)
    p.update(5)
    p.update(7)
    p.finish()
    assert p.done_bytes == 12


def test_event_numbers() -> None:
    e = ProgressEvent(done_bytes=512 * 1024 * 1024, total_bytes=1024**3, elapsed_s=4.0)
    assert e.percent == 50.0
    assert e.rate_bps == 128 * 1024 * 1024
    assert e.describe() == "512.0 MiB (50%) at 128.0 MiB/s"
    assert ProgressEvent(10, None, 0.0).describe() == "10 B at 0 B/s"
    assert ProgressEvent(10, 0, 1.0).percent is None
    assert ProgressEvent(20, 10, 1.0).percent == 100.0  # a source that grew never shows 200%


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**5, "3072.0 TiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_log_progress_writes_info_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    out = io.StringIO()
    monkeypatch.setattr(driverlog, "stream", out)
    report = log_progress("http import")
    report(ProgressEvent(1024, 2048, 1.0))
    report(ProgressEvent(2048, 2048, 2.0, final=True))
    assert out.getvalue().splitlines() == [
        "INFO: http import progress: 1.0 KiB (50%) at 1.0 KiB/s",
        "INFO: http import done: 2.0 KiB (100%) at 1.0 KiB/s",
    ]
