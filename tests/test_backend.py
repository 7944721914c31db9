"""The torch side's process settings: malloc tuning, per-thread torch threads, side-by-side passes."""

from __future__ import annotations

import threading

import pytest
import torch

from embedapi import backend, create_app

from .conftest import EMBED


def test_malloc_tuning_applies_on_glibc_and_yields_to_the_environment():
    assert backend.tune_malloc({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
    assert backend.tune_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) is False
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert backend.tune_malloc({}) is True


def test_torch_threads_are_set_per_calling_thread():
    """A lane's thread count stays its own: the thread that set 1 runs on 1, the caller keeps its count."""
    before = torch.get_num_threads()
    seen: list[int] = []

    def lane() -> None:
        backend.use_threads(1)
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=lane)
    thread.start()
    thread.join()
    assert seen == [1] and torch.get_num_threads() == before


@pytest.mark.parametrize("device,threads,lanes", [("cpu", 2, 2), ("cpu", 16, 2), ("cpu", 1, 1), ("cuda:0", 8, 1),
                                                  ("mps", 8, 1)])
def test_default_side_by_side_passes(device, threads, lanes):
    assert backend.default_lanes(device, threads) == lanes


def test_the_registry_gives_every_model_the_device_slots(models_file):
    before = torch.get_num_threads()
    app = create_app({"models_file": str(models_file), "load_models": "sync", "parallel_batches": 3,
                      "torch_threads": 2})
    try:
        models = app.extensions["embedapi"].registry.models
        slots = {id(m.engine.slots) for m in models.values()}
        assert len(slots) == 1  # one device: its models share the lanes
        engine = models[EMBED].engine
        assert engine.slots.lanes == 3 and engine.slots.threads == 2 and engine.slots.share == 1
        assert len(engine._threads) == 3
    finally:
        app.extensions["embedapi"].registry.shutdown()
        torch.set_num_threads(before)


def test_batching_off_runs_one_pass_at_a_time_on_every_thread(models_file):
    """The seeds' design, kept for comparison: one request per pass, never two passes at once on the
    device, whatever EMBEDAPI_PARALLEL_BATCHES says; the single lane is shared by the device's models."""
    before = torch.get_num_threads()
    app = create_app({"models_file": str(models_file), "load_models": "sync", "batching": False,
                      "parallel_batches": 2, "torch_threads": 2})
    try:
        models = app.extensions["embedapi"].registry.models
        assert len({id(m.engine.slots) for m in models.values()}) == 1
        slots = models[EMBED].engine.slots
        assert slots.lanes == 1 and slots.threads == 2
    finally:
        app.extensions["embedapi"].registry.shutdown()
        torch.set_num_threads(before)
