"""The torch side: malloc tuning, per-thread torch threads, side-by-side passes, the bfloat16 GELU layout."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from embedapi import create_app
from embedapi.backends import pytorch as backend
from embedapi.config import ModelSpec

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
        assert engine.slots.spare == 1 and len(engine.slots._threads) == 4  # + the CPU's spare lane
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
        assert slots.lanes == 1 and slots.threads == 2 and slots.spare == 0
    finally:
        app.extensions["embedapi"].registry.shutdown()
        torch.set_num_threads(before)


def _wrapped(model: torch.nn.Module) -> list[bool]:
    return [isinstance(m.act, backend.ContiguousInput) for m in model.modules()
            if type(m).__name__ == "ModernBertMLP"]


@pytest.mark.parametrize("kind", ["embedding", "rerank"])
def test_bfloat16_cpu_runners_apply_the_mlp_activation_to_a_contiguous_copy(model_dirs, kind):
    spec = ModelSpec(id="t", source=str(model_dirs["embed" if kind == "embedding" else "rerank"]), kind=kind)
    bf16 = backend.TorchRunner(backend.load(spec, "cpu"), "cpu", torch.bfloat16, kind)
    fp32 = backend.TorchRunner(backend.load(spec, "cpu"), "cpu", torch.float32, kind)
    assert _wrapped(bf16.model) and all(_wrapped(bf16.model))
    assert _wrapped(fp32.model) and not any(_wrapped(fp32.model))  # float32 measured no faster: left alone
    assert backend.contiguous_activations(bf16.model) == 0  # already wrapped: not wrapped twice


def test_bfloat16_vectors_with_the_wrapped_activation_are_encodes(model_dirs):
    spec = ModelSpec(id="t", source=str(model_dirs["embed"]), kind="embedding")
    plain = backend.load(spec, "cpu").to(torch.bfloat16)  # as sentence-transformers runs it in bfloat16
    runner = backend.TorchRunner(backend.load(spec, "cpu"), "cpu", torch.bfloat16, "embedding")
    texts = ["今日は良い天気です。" * k for k in (1, 4, 12)]
    ids = [plain.tokenizer(t)["input_ids"] for t in texts]
    want = plain.encode(texts, batch_size=len(texts), normalize_embeddings=False, convert_to_tensor=True)
    # bit-identical here; the tolerance is one bfloat16 rounding, for CPUs whose two erf kernels differ more
    np.testing.assert_allclose(runner.run(ids), want.float().numpy(), rtol=0, atol=1e-2)


# float32: the two GELU kernels round erf a few ulps apart, so the bound is relative (1e-6 is ~8 ulps)
# as well as absolute; with an absolute 1e-6 alone, random inputs near 4 failed about one run in three.
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 1e-6, 1e-6), (torch.bfloat16, 0, 1e-2)])
def test_contiguous_input_computes_the_same_activation(dtype, rtol, atol):
    seen: list[bool] = []

    class Gelu(torch.nn.GELU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.is_contiguous())
            return super().forward(x)

    gen = torch.Generator().manual_seed(0)
    half, _gate = torch.randn(7, 33, 2 * 96, dtype=dtype, generator=gen).chunk(2, dim=-1)  # a strided view, as in the MLP
    assert not half.is_contiguous()
    got = backend.ContiguousInput(Gelu())(half)
    torch.testing.assert_close(got, torch.nn.functional.gelu(half), rtol=rtol, atol=atol)
    assert seen == [True]
