"""The one signal-to-exception mechanism: which signals unwind, nesting, restore."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from onemarket.errors import ActionTimeout, MarketError
from onemarket.transfer.interrupt import (
    STOP_SIGNALS,
    CutShort,
    Interrupted,
    cut_short,
    deferred,
    interruptible,
    signals_to_main_thread,
)

WAIT_S = 5.0
"""Bound on waiting for a signal to arrive (it arrives at once; the wait never ends normally)."""


def _wait() -> None:
    threading.Event().wait(WAIT_S)


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)]
)
def test_each_stop_signal_raises_and_handlers_are_restored(sig: int, status: int) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    with pytest.raises(Interrupted, match=signal.Signals(sig).name) as caught, interruptible("t"):
        os.kill(os.getpid(), sig)
        _wait()
    assert isinstance(caught.value, ActionTimeout) and isinstance(caught.value, MarketError)
    assert caught.value.signum == sig and caught.value.exit_status == status
    assert {s: signal.getsignal(s) for s in before} == before


def test_except_exception_inside_does_not_swallow_it() -> None:
    with pytest.raises(Interrupted), interruptible("test"):
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            _wait()
        except Exception:  # noqa: BLE001 - what a careless reader would do
            pytest.fail("the signal was caught as an ordinary error")


def test_a_second_signal_during_clean_up_is_ignored() -> None:
    cleaned = False
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible("outer"), interruptible("in"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait()
        finally:
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: clean-up runs to its end
            cleaned = True
    assert cleaned


def test_a_second_signal_ends_only_a_wait_that_may_be_cut_short() -> None:
    """The clean-up's wait ends at the second signal (CutShort, caught around the block); the
    rest of the clean-up still runs, no later wait is cut (a third signal is ignored), and
    the first signal is what leaves the block."""
    steps: list[str] = []
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible("outer"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait()
        finally:
            try:
                with cut_short():
                    os.kill(os.getpid(), signal.SIGINT)
                    _wait()
                    steps.append("waited to the end")
            except CutShort:
                steps.append("cut")
            with cut_short():  # inert now: the wait was cut once
                os.kill(os.getpid(), signal.SIGHUP)
                steps.append("not cut again")
            steps.append("cleaned")
    assert steps == ["cut", "not cut again", "cleaned"]


def test_cut_short_changes_nothing_before_a_signal_or_after_an_error() -> None:
    # no signal yet: the first one raises as usual
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible("t"), cut_short():
        os.kill(os.getpid(), signal.SIGTERM)
        _wait()
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible("t"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            _wait()
        finally:
            with pytest.raises(ValueError), cut_short():
                raise ValueError("a failure inside the wait")
            os.kill(os.getpid(), signal.SIGINT)  # ignored: the block is left, not armed


def test_a_signal_inside_deferred_is_raised_when_the_call_is_done() -> None:
    steps: list[str] = []
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible("t"):
        with deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("the call's answer is stored")
        steps.append("not reached")
    assert steps == ["the call's answer is stored"]


def test_a_signal_held_by_deferred_wins_over_the_call_failing() -> None:
    with pytest.raises(Interrupted, match="SIGHUP"), interruptible("t"), deferred():
        os.kill(os.getpid(), signal.SIGHUP)
        raise ValueError("oned refused")


def test_cut_short_and_deferred_do_nothing_outside_the_main_thread() -> None:
    seen: list[str] = []

    def work() -> None:
        with interruptible("thread"), deferred(), cut_short():
            seen.append("ran")

    t = threading.Thread(target=work)
    t.start()
    t.join(WAIT_S)
    assert seen == ["ran"]


def test_an_ignored_sighup_stays_ignored() -> None:
    """Under ``nohup`` the user asked for SIGHUP to be ignored."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interruptible("test"):
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_outside_the_main_thread_it_does_nothing() -> None:
    seen: list[object] = []

    def work() -> None:
        with interruptible("thread"):
            seen.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=work)
    t.start()
    t.join(WAIT_S)
    assert seen == [signal.getsignal(signal.SIGTERM)]


def test_threads_started_inside_block_the_stop_signals() -> None:
    masks: list[set[int]] = []
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with signals_to_main_thread():
        t = threading.Thread(
            target=lambda: masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        )
        t.start()
    t.join(WAIT_S)
    assert set(STOP_SIGNALS) <= masks[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
