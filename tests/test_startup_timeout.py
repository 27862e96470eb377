"""The strategies' start-up (rendezvous) timeout: its own argument, minutes by default, checked at once.
A late rank joining a run whose peer timeout is small: ``tests/app/test_checkpoint_recovery.py``."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ring_plugin.lightning import RingDeepSpeedStrategy, RingStrategy


@pytest.mark.parametrize("strategy", [RingStrategy, RingDeepSpeedStrategy])
def test_startup_timeout_is_separate_from_the_peer_timeout(strategy: type) -> None:
    default = strategy(timeout=timedelta(seconds=5))
    assert default.startup_timeout == timedelta(seconds=600) and default._timeout == timedelta(seconds=5)
    assert strategy(startup_timeout=90).startup_timeout == timedelta(seconds=90)
    assert strategy(startup_timeout=timedelta(minutes=2)).startup_timeout == timedelta(seconds=120)
    for bad in (0, -1.0, "600", True):
        with pytest.raises(ValueError, match=f"startup_timeout={bad!r} must be positive seconds"):
            strategy(startup_timeout=bad)
