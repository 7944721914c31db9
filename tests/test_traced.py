"""The traced forward pass (CPU): used when it matches the eager model, else the model stays eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from embedapi import create_app
from embedapi.backends import pytorch as backend
from embedapi.config import ModelSpec

from .conftest import EMBED, RERANK, torch_ops_called_from_python


def _texts(n: int = 6) -> list[str]:
    base = "今日は良い天気なので、川沿いの道を歩いて図書館まで行きました。"
    return [base * k for k in (1, 2, 5, 9, 14, 20)][:n]  # 20-odd to 300-odd tokens: both sides of the local window


def _runner(model_dirs, kind: str, trace: bool, dtype: torch.dtype = torch.float32,
            prepack: bool = False) -> backend.TorchRunner:
    spec = ModelSpec(id="t", source=str(model_dirs["embed" if kind == "embedding" else "rerank"]), kind=kind)
    return backend.TorchRunner(backend.load(spec, "cpu"), "cpu", dtype, kind, trace=trace, prepack=prepack)


def _assert_left_eager(model_dirs, st_model, caplog, why: str) -> None:
    """Loading with tracing asked for gives an eager runner, a warning saying `why`, and encode's vectors."""
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        runner = _runner(model_dirs, "embedding", True)
    assert not runner.traced and why in caplog.text
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts(3)]
    np.testing.assert_allclose(runner.run(ids), st_model.encode(_texts(3), normalize_embeddings=False),
                               rtol=0, atol=1e-6)


def test_the_app_runs_the_models_traced_on_cpu_on_the_torch_backend(models_file):
    app = create_app({"models_file": str(models_file), "load_models": "sync", "backend": "torch"})
    try:
        models = app.extensions["embedapi"].registry.models
        assert models[EMBED].backend == models[RERANK].backend == "torch"
        assert models[EMBED].engine.runner.traced and models[RERANK].engine.runner.traced
    finally:
        app.extensions["embedapi"].registry.shutdown()


def test_traced_embeddings_are_the_eager_ones_and_encodes(model_dirs, st_model):
    traced, eager = _runner(model_dirs, "embedding", True), _runner(model_dirs, "embedding", False)
    assert traced.traced and not eager.traced
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts()]
    assert max(map(len, ids)) > 128 + 64 and min(map(len, ids)) < 64
    got = traced.run(ids)
    np.testing.assert_array_equal(got, eager.run(ids))
    want = st_model.encode(_texts(), batch_size=len(ids), normalize_embeddings=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # rows of other batch shapes than the first (the trace is not tied to one shape)
    np.testing.assert_allclose(traced.run(ids[:1]), want[:1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(traced.run(ids[2:5]), want[2:5], rtol=0, atol=1e-6)


def test_traced_rerank_logits_are_the_eager_ones(model_dirs, ce_model):
    traced, eager = _runner(model_dirs, "rerank", True), _runner(model_dirs, "rerank", False)
    assert traced.traced
    pairs = [ce_model.tokenizer("東京の天気は？", t)["input_ids"] for t in _texts()]
    np.testing.assert_array_equal(traced.run(pairs), eager.run(pairs))


@pytest.mark.parametrize("kind", ["embedding", "rerank"])
def test_a_traced_pass_is_one_call_pooling_included(model_dirs, st_model, kind):
    """The whole model is traced, the sentence-transformers pooling after the transformer included: a pass calls
    no torch op from Python (the eager pooling called ten, each a GIL hand-off)."""
    traced = _runner(model_dirs, kind, True)
    assert traced.traced and traced.traced_whole
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts(3)]
    traced.run(ids)
    assert torch_ops_called_from_python(lambda: traced.run(ids)) == []
    eager = _runner(model_dirs, kind, False)
    np.testing.assert_array_equal(traced.run(ids), eager.run(ids))
    assert torch_ops_called_from_python(lambda: eager.run(ids))  # what the check above can see


def test_when_the_whole_model_does_not_trace_its_transformer_alone_is(model_dirs, st_model, monkeypatch, caplog):
    real_trace = torch.jit.trace

    def no_pooling(module, example, **kwargs):
        if isinstance(module, backend._Whole):
            raise RuntimeError("pooling does not trace")
        return real_trace(module, example, **kwargs)
    monkeypatch.setattr(backend.torch.jit, "trace", no_pooling)
    with caplog.at_level(logging.INFO, logger="embedapi.backends.pytorch"):
        runner = _runner(model_dirs, "embedding", True)
    assert runner.traced and not runner.traced_whole
    assert "pooling does not trace" in caplog.text and "its transformer alone is traced" in caplog.text
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts()]
    np.testing.assert_allclose(runner.run(ids), st_model.encode(_texts(), batch_size=len(ids),
                                                                normalize_embeddings=False), rtol=0, atol=1e-6)


def test_traced_bfloat16_matches_eager_bfloat16(model_dirs, st_model):
    traced = _runner(model_dirs, "embedding", True, torch.bfloat16)
    eager = _runner(model_dirs, "embedding", False, torch.bfloat16)
    assert traced.traced
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts()]
    np.testing.assert_allclose(traced.run(ids), eager.run(ids), rtol=0, atol=1e-2)


def test_a_failing_trace_leaves_the_model_eager(model_dirs, st_model, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded")
    monkeypatch.setattr(backend.torch.jit, "trace", broken)
    _assert_left_eager(model_dirs, st_model, caplog, "tracer exploded")


def test_a_trace_that_differs_from_eager_is_not_used(model_dirs, st_model, monkeypatch, caplog):
    """A traced graph that baked in something shape-dependent gives other numbers on other shapes:
    here, one that is right only for the traced example's width."""
    real_trace = torch.jit.trace

    def shape_bound(module, example, **kwargs):
        script, width = real_trace(module, example, **kwargs), example[0].shape[1]
        return lambda *inputs: script(*inputs) * (1.0 if inputs[0].shape[1] == width else 1.5)
    monkeypatch.setattr(backend.torch.jit, "trace", shape_bound)
    _assert_left_eager(model_dirs, st_model, caplog, "differs from the eager one")


needs_onednn = pytest.mark.skipif(not backend.prepack_available(torch.float32),
                                  reason="oneDNN's linear is used on x86-64 CPU builds with mkldnn only")


def _linears(runner: backend.TorchRunner) -> tuple[int, int]:
    """(plain nn.Linear, PackedLinear) modules in the runner's transformer."""
    modules = list(runner.model[0].model.modules())
    return (sum(type(m) is torch.nn.Linear for m in modules), sum(isinstance(m, backend.PackedLinear) for m in modules))


@needs_onednn
@pytest.mark.parametrize("trace", [True, False])
def test_prepacked_linears_give_encode_and_predict(model_dirs, st_model, ce_model, trace):
    """Every linear of both kinds' transformers reordered once for oneDNN: the rows stay encode's and the scores
    predict's (float32, to 1e-5) on lengths both sides of the local window, and a traced pass is still one call."""
    runner = _runner(model_dirs, "embedding", trace, prepack=True)
    assert runner.prepacked > 0 and _linears(runner) == (0, runner.prepacked) and runner.traced is trace
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts()]
    want = st_model.encode(_texts(), batch_size=len(ids), normalize_embeddings=False)
    np.testing.assert_allclose(runner.run(ids), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(runner.run(ids[:1]), want[:1], rtol=0, atol=1e-5)
    if trace:
        assert torch_ops_called_from_python(lambda: runner.run(ids[:3])) == []
    reranker = _runner(model_dirs, "rerank", trace, prepack=True)
    assert reranker.prepacked > 0 and _linears(reranker) == (0, reranker.prepacked)  # the head's linears too
    pairs = [("東京の天気は？", t) for t in _texts()]
    ids = [ce_model.tokenizer(*pair)["input_ids"] for pair in pairs]
    scores = backend.activation(ce_model)(reranker.run(ids))
    np.testing.assert_allclose(scores, ce_model.predict(pairs, batch_size=len(pairs)), rtol=0, atol=1e-5)


@needs_onednn
def test_prepacked_bfloat16_keeps_the_plain_bfloat16_rows(model_dirs, st_model):
    packed = _runner(model_dirs, "embedding", True, torch.bfloat16, prepack=True)
    plain = _runner(model_dirs, "embedding", True, torch.bfloat16)
    assert packed.prepacked > 0 and plain.prepacked == 0
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts()]
    a, b = packed.run(ids), plain.run(ids)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= 0.99999


@needs_onednn
def test_prepacked_linears_that_change_the_rows_are_put_back(model_dirs, st_model, monkeypatch, caplog):
    """An injected fault in the packed linear: the check at load puts the plain modules back, the model serves
    encode's rows, and the log says why."""
    real = backend.PackedLinear.forward
    monkeypatch.setattr(backend.PackedLinear, "forward", lambda self, x: real(self, x) * 1.01)
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        runner = _runner(model_dirs, "embedding", True, prepack=True)
    assert runner.prepacked == 0 and _linears(runner)[1] == 0 and "linear weights not prepacked" in caplog.text
    ids = [st_model.tokenizer(t)["input_ids"] for t in _texts(3)]
    np.testing.assert_allclose(runner.run(ids), st_model.encode(_texts(3), normalize_embeddings=False),
                               rtol=0, atol=1e-6)


@needs_onednn
def test_large_float32_models_keep_their_shared_weights(model_dirs, monkeypatch, caplog):
    """A float32 model computes on the model file's pages, shared by the workers: past PREPACK_FLOAT32_MAX_BYTES
    of linear weights (the 310m shapes) it is not packed into each worker's own memory; bfloat16 still is."""
    monkeypatch.setattr(backend, "PREPACK_FLOAT32_MAX_BYTES", 1024)
    with caplog.at_level(logging.INFO, logger="embedapi.backends.pytorch"):
        runner = _runner(model_dirs, "embedding", True, prepack=True)
    assert runner.prepacked == 0 and _linears(runner)[0] > 0 and _linears(runner)[1] == 0
    assert "linear weights not prepacked: in float32 they stay the model file's shared pages" in caplog.text
    if backend.prepack_available(torch.bfloat16):
        assert _runner(model_dirs, "embedding", True, torch.bfloat16, prepack=True).prepacked > 0


@needs_onednn
def test_the_app_prepacks_torch_models_unless_told_not_to(models_file):
    for prepack in (True, False):
        app = create_app({"models_file": str(models_file), "load_models": "sync", "backend": "torch",
                          "prepack": prepack})
        try:
            models = app.extensions["embedapi"].registry.models
            assert all(bool(models[m].engine.runner.prepacked) is prepack for m in (EMBED, RERANK))
        finally:
            app.extensions["embedapi"].registry.shutdown()


@pytest.mark.parametrize("device", ["cuda:0", "mps"])
def test_tracing_is_for_cpu_only(device):
    """GPU passes stay eager: their traced numerics are untested here (no GPU on the test machine)."""
    assert backend.TorchRunner.trace_on(device, True) is False
    assert backend.TorchRunner.trace_on("cpu", True) is True
    assert backend.TorchRunner.trace_on("cpu", False) is False


def test_prepacking_bounds_torchs_onednn_caches_unless_the_environment_sets_them():
    """A prepacked linear leaves a oneDNN primitive per input shape in two caches (ideep's per thread, oneDNN's);
    at their default of 1024 the soak's workers grew by hundreds of MB. A user's value wins."""
    env: dict[str, str] = {}
    assert backend.bound_onednn_caches(env) == ["LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert env == {"LRU_CACHE_CAPACITY": "32", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32"}
    env = {"DNNL_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "8"}
    assert backend.bound_onednn_caches(env) == []
    assert env == {"DNNL_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "8"}
