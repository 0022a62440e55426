"""gpusnap.interrupts: a signal in a held() block is delivered when it ends, one in a
shielded() block is dropped; real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest

from gpusnap import interrupts


class Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise Terminated


def test_held_delivers_the_first_signal_once_the_block_ends():
    ran_to_end = False
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held() as held:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            ran_to_end = True
    assert ran_to_end and held.signals == [signal.SIGINT, signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_hands_sigterm_to_the_handler_in_place(monkeypatch):
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is _raise_terminated
    finally:
        signal.signal(signal.SIGTERM, old)


def test_shielded_drops_and_an_inner_held_hands_over_to_it():
    with interrupts.shielded() as shield:
        with interrupts.held() as inner:
            os.kill(os.getpid(), signal.SIGINT)
        assert inner.interrupted
    assert shield.interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_noted_nothing_raised():
    with interrupts.held() as held:
        pass
    assert not held.interrupted
