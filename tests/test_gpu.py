"""On a real CUDA GPU (marked `gpu`: skipped without one; bench/gpu_check.py runs them on a GPU machine).

What the CPU tests can only inject: the dtype the device's capability gives, vectors equal to
sentence-transformers' on the same GPU and dtype, a real out-of-memory split, and a Gunicorn worker that
sees only its GPU while the master never touches CUDA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from embedapi import create_app
from embedapi.backends import pytorch as backend
from embedapi.config import ModelSpec

from .conftest import EMBED
from .server import GunicornServer, call

pytestmark = pytest.mark.gpu

TEXTS = ["名古屋は愛知県の県庁所在地です。", "温泉に入ると体が温まります。" * 20, "深層学習のモデルはGPUで学習します。" * 200]


@pytest.fixture(scope="module")
def auto_models_file(model_dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "models.toml"
    path.write_text(f'[[models]]\nid = "{EMBED}"\nsource = "{model_dirs["embed"]}"\ndtype = "auto"\n', encoding="utf-8")
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def test_dtype_attention_and_vectors_on_this_gpu(auto_models_file, model_dirs):
    from sentence_transformers import SentenceTransformer

    major, _ = torch.cuda.get_device_capability(0)
    want_dtype = torch.bfloat16 if major >= 8 else torch.float16
    app = create_app({"models_file": str(auto_models_file), "load_models": "sync", "device": "cuda"})
    try:
        client = app.test_client()
        (info,) = client.get("/v1/models").json["data"]
        assert info["device"] == "cuda:0" and info["dtype"] == backend.dtype_name(want_dtype)
        assert info["attention"] in ("sdpa", "flash_attention_2")
        got = np.array([d["embedding"] for d in client.post("/v1/embeddings", json={
            "model": EMBED, "input": TEXTS, "input_type": "document"}).json["data"]], dtype=np.float32)
    finally:
        app.extensions["embedapi"].registry.shutdown()
    prefixed = ["検索文書: " + t for t in TEXTS]
    same = SentenceTransformer(str(model_dirs["embed"]), device="cuda",
                               model_kwargs={"dtype": want_dtype, "attn_implementation": info["attention"]})
    want = same.encode(prefixed, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    assert _cosine(got, want).min() > 0.999  # the same model on the same GPU and dtype
    cpu = SentenceTransformer(str(model_dirs["embed"]), device="cpu")
    exact = cpu.encode(prefixed, normalize_embeddings=True, convert_to_numpy=True)
    assert _cosine(got, exact).min() > 0.99  # half precision costs little against float32 on CPU


def test_a_real_out_of_memory_batch_is_split_and_answers_like_an_unsplit_one(model_dirs):
    spec = ModelSpec(id="t", source=str(model_dirs["embed"]), kind="embedding")
    runner = backend.TorchRunner(backend.load(spec, "cuda:0"), "cuda:0", torch.float32, "embedding")
    tok = runner.model.tokenizer
    seq = tok("名古屋の温泉。" * 2000)["input_ids"][:4096]
    batch = [seq] * 32

    def peak(rows: list[list[int]]) -> int:
        backend.release_memory()
        torch.cuda.reset_peak_memory_stats(0)
        runner.run(rows)
        return torch.cuda.max_memory_allocated(0)

    want = runner.run(batch)
    full, half = peak(batch), peak(batch[:16])
    total = torch.cuda.get_device_properties(0).total_memory
    guard = backend.GuardedRunner(runner)
    try:
        backend.release_memory()
        torch.cuda.set_per_process_memory_fraction((half + (full - half) / 2) / total, 0)
        got = guard.run(batch)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        backend.release_memory()
    assert guard.splits >= 1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_a_gunicorn_worker_sees_only_its_gpu_and_the_master_no_cuda(auto_models_file):
    server = GunicornServer(auto_models_file, workers=1, env={"EMBEDAPI_DEVICE": "auto"}).start(timeout=300)
    try:
        status, _, body = call("GET", server.url + "/v1/models")
        assert status == 200 and body["data"][0]["device"] == "cuda:0"
        status, _, _ = call("POST", server.url + "/v1/embeddings", {"model": EMBED, "input": TEXTS})
        assert status == 200
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "libcuda" not in maps and "libtorch" not in maps
        log = server.log()
        assert f"CUDA {torch.version.cuda}" in log and "CUDA_VISIBLE_DEVICES=" in log and "warm-up at" in log
    finally:
        server.stop()
