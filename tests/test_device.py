"""Device, dtype and attention choice, and warm-up at the worst shapes, with the CUDA facts injected.

No GPU is needed: compute capabilities, CUDA availability and out-of-memory errors are stand-ins; the
models, the loading and the forward passes are the real ones (on CPU).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from embedapi import create_app
from embedapi.backends import pytorch as backend
from embedapi.config import ModelSpec, Settings, normalize_device
from embedapi.errors import ConfigError

from .conftest import EMBED


@pytest.mark.parametrize("raw,want", [("auto", "auto"), ("", "auto"), (" CUDA ", "cuda"), ("Cuda:02", "cuda:2"),
                                      ("cpu", "cpu"), ("MPS", "mps")])
def test_device_strings_are_normalised_once(raw, want):
    assert normalize_device(raw) == want
    assert Settings.from_env({"EMBEDAPI_DEVICE": raw}).device == want


@pytest.mark.parametrize("raw", ["gpu", "cuda:", "cuda:x", "cuda1"])
def test_a_wrong_device_names_the_setting_and_the_choices(raw):
    with pytest.raises(ConfigError, match="EMBEDAPI_DEVICE must be auto, cpu, cuda, cuda:N or mps"):
        Settings.from_env({"EMBEDAPI_DEVICE": raw})


@pytest.fixture
def caplog(caplog):
    """pytest's caplog, also fed by the `embedapi` logger (which stops propagating once an app configured it)."""
    logger = logging.getLogger("embedapi")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def capability(monkeypatch):
    """Inject the compute capability; record which device was asked; emulated-bf16 probing is forbidden."""
    asked: list[torch.device] = []

    def set_capability(cap: tuple[int, int]) -> list[torch.device]:
        def get(device=None):
            asked.append(device)
            return cap
        monkeypatch.setattr(torch.cuda, "get_device_capability", get)
        return asked

    def forbidden(*args, **kwargs):
        raise AssertionError("is_bf16_supported counts emulation and asks the current device, not the worker's")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", forbidden)
    monkeypatch.setattr(torch.version, "hip", None)
    return set_capability


@pytest.mark.parametrize("cap,want", [((6, 1), torch.float16), ((7, 0), torch.float16), ((7, 5), torch.float16),
                                      ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16),
                                      ((12, 0), torch.bfloat16)])
def test_dtype_auto_follows_the_workers_own_gpu(capability, cap, want):
    asked = capability(cap)
    assert backend.pick_dtype("auto", "cuda:0") is want
    assert backend.pick_dtype("auto", "cuda:3") is want
    assert asked == [torch.device("cuda:0"), torch.device("cuda:3")]  # the worker's device, never the current one


def test_explicit_dtypes_win_and_rocm_and_cpu_follow_their_rules(capability, monkeypatch):
    capability((7, 5))
    assert backend.pick_dtype("bfloat16", "cuda:0") is torch.bfloat16
    assert backend.pick_dtype("float32", "cuda:0") is torch.float32
    monkeypatch.setattr(torch.version, "hip", "6.4")
    assert backend.pick_dtype("auto", "cuda:0") is torch.bfloat16
    monkeypatch.setattr(backend, "cpu_has_native_bf16", lambda: True)
    assert backend.pick_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(backend, "cpu_has_native_bf16", lambda: False)
    assert backend.pick_dtype("auto", "cpu") is torch.float32


def test_flash_attention_only_where_it_runs(capability, monkeypatch):
    installed = {"flash_attn": object()}
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: installed.get(name))
    capability((9, 0))
    assert backend.pick_attention("cuda:0", torch.bfloat16) == "flash_attention_2"
    assert backend.pick_attention("cuda:0", torch.float32) == "sdpa"
    assert backend.pick_attention("cpu", torch.bfloat16) == "sdpa"
    capability((7, 5))
    assert backend.pick_attention("cuda:0", torch.float16) == "sdpa"  # FlashAttention 2 needs 8.0+
    capability((9, 0))
    installed.clear()
    assert backend.pick_attention("cuda:0", torch.bfloat16) == "sdpa"


def test_auto_falls_back_to_cpu_loudly_when_torch_cannot_use_the_gpu(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")  # Gunicorn gave this worker a GPU
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        assert backend.pick_device("auto") == "cpu"
    assert "FALLING BACK TO CPU" in caplog.text and "CPU-only build" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build, but an old driver
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        assert backend.pick_device("AUTO") == "cpu"
    assert "FALLING BACK TO CPU" in caplog.text and "driver" in caplog.text
    with pytest.raises(ConfigError, match="EMBEDAPI_DEVICE=cuda, but torch .* cannot use it"):
        backend.pick_device("cuda")  # asked for explicitly: no silent fallback

    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # no GPU meant for this process: quiet
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        assert backend.pick_device("auto") == "cpu"
    assert "FALLING BACK" not in caplog.text

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.pick_device("auto") == backend.pick_device("cuda") == "cuda:0"
    assert backend.pick_device("cuda:1") == "cuda:1"


@pytest.fixture(scope="module")
def one_model_file(model_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("one-model") / "models.toml"
    path.write_text(f'[[models]]\nid = "{EMBED}"\nsource = "{model_dirs["embed"]}"\ndtype = "float32"\n',
                    encoding="utf-8")
    return path


def test_a_worker_given_a_gpu_that_torch_cannot_use_serves_on_cpu(one_model_file, monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # this torch is the CPU build: the real fallback
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        app = create_app({"models_file": str(one_model_file), "load_models": "sync", "device": "auto"})
    try:
        assert "FALLING BACK TO CPU" in caplog.text
        (model,) = app.test_client().get("/v1/models").json["data"]
        assert model["device"] == "cpu" and model["ready"] and model["attention"] == "sdpa"
        resp = app.test_client().post("/v1/embeddings", json={"model": EMBED, "input": "CPUで答える"})
        assert resp.status_code == 200
    finally:
        app.extensions["embedapi"].registry.shutdown()


def test_weights_load_directly_in_the_chosen_dtype_as_sentence_transformers_does(model_dirs):
    from sentence_transformers import SentenceTransformer

    spec = ModelSpec(id="t", source=str(model_dirs["embed"]), kind="embedding")
    model = backend.load(spec, "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # no float32 copy to cast afterwards
    assert backend.attention_of(model) == "sdpa"
    reference = SentenceTransformer(str(model_dirs["embed"]), device="cpu", model_kwargs={"dtype": torch.bfloat16})
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in reference.named_buffers()}
    runner = backend.TorchRunner(model, "cpu", torch.bfloat16, "embedding")
    texts = ["今日は良い天気です。" * k for k in (1, 4, 12)]
    ids = [reference.tokenizer(t)["input_ids"] for t in texts]
    want = reference.encode(texts, batch_size=len(texts), normalize_embeddings=False, convert_to_tensor=True)
    np.testing.assert_allclose(runner.run(ids), want.float().numpy(), rtol=0, atol=1e-2)


def test_warm_up_shapes_are_the_worst_the_budget_allows():
    assert backend.warm_shapes(16384, 256, 8192) == [(2, 8192), (256, 64)]
    assert backend.warm_shapes(4096, 256, 8192) == [(1, 8192), (256, 16)]  # one long input is over the budget
    assert backend.warm_shapes(16384, 32, 512) == [(32, 512)]
    assert backend.warm_shapes(4096, 256, 16) == [(256, 16)]
    assert backend.warms_worst_shapes("cuda:0") and backend.warms_worst_shapes("mps")
    assert not backend.warms_worst_shapes("cpu")


class _MemoryLimited(backend.TorchRunner):
    """The real runner, on a device with room for `limit` padded tokens per pass (the injected fault)."""

    limit = 1 << 30
    seen: list[tuple[int, int]] = []

    def run(self, batch):
        shape = (len(batch), max(len(s) for s in batch))
        type(self).seen.append(shape)
        if shape[0] * shape[1] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {shape[0] * shape[1]} units")
        return super().run(batch)


def test_warm_up_at_the_worst_shapes_fails_the_load_naming_the_settings(one_model_file, monkeypatch):
    monkeypatch.setattr(backend, "warms_worst_shapes", lambda device: True)  # as on a GPU
    monkeypatch.setattr(backend, "TorchRunner", _MemoryLimited)
    monkeypatch.setattr(_MemoryLimited, "seen", [])
    settings = {"models_file": str(one_model_file), "load_models": "off", "max_batch_tokens": 2048, "trace": False,
                "backend": "torch",  # as on a GPU, where every model runs on torch
                "max_batch_size": 64}
    app = create_app(settings)
    registry = app.extensions["embedapi"].registry
    monkeypatch.setattr(_MemoryLimited, "limit", 8192)
    try:
        registry.load_all("cpu")  # fits: warmed at (1, 8192) and (64, 32) before any client is served
        assert _MemoryLimited.seen[:2] == [(1, 8192), (64, 32)] and registry.ready
    finally:
        registry.shutdown()

    monkeypatch.setattr(_MemoryLimited, "limit", 4096)  # the longest input no longer fits
    app = create_app(settings)
    registry = app.extensions["embedapi"].registry
    with pytest.raises(ConfigError) as err:
        registry.load_all("cpu")
    message = str(err.value)
    assert "warm-up batch of 1 x 8192 tokens does not fit" in message
    assert "EMBEDAPI_MAX_BATCH_TOKENS (now 2048)" in message and "max_seq_length" in message
    assert registry.state == "failed" and not registry.models
