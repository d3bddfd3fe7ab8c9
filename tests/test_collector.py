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


def test_a_cache_is_frozen_out_of_the_collections_scans_as_it_grows_by_a_quarter():
    freezer = collector.Freezer(floor=1000)
    before = gc.get_freeze_count()
    cache = [[i] for i in range(999)]  # lists: objects the collector tracks
    try:
        assert not freezer.grown_to(len(cache))
        assert gc.get_freeze_count() == before
        cache.append([999])
        assert freezer.grown_to(len(cache))
        assert gc.get_freeze_count() >= before + len(cache)
        cache += [[i] for i in range(249)]
        assert not freezer.grown_to(len(cache))  # not a quarter more yet
        cache.append([0])
        assert freezer.grown_to(len(cache))
        cache.clear()
        assert not freezer.grown_to(0)
        assert freezer.grown_to(1000)  # emptied: from the floor again
    finally:
        gc.unfreeze()
