"""The collector pause that the workers and replay wrap their hot loops in."""

from __future__ import annotations

import gc

import pytest

from stream_ml import collector


def test_a_batch_pauses_the_garbage_collector_and_gives_its_state_back():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
        with collector.paused():  # batches of two workers in one process
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("a failed batch")
    assert gc.isenabled()
    gc.disable()  # a host that runs without the collector keeps it off
    try:
        with collector.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
