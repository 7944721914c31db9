"""Live Gunicorn servers for the real-client suite.

The models are configured under their REAL names (`cl-nagoya/ruri-v3-310m`, `cl-nagoya/ruri-v3-30m`,
`cl-nagoya/ruri-v3-reranker-310m`), so the examples of README.md and docs/clients.md and the client snippets
run unchanged, while their `source` points at the tiny Ruri-shaped models that tests/conftest.py's
`model_dirs` builds. The models are loaded by the real loading code; nothing in the request path is replaced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ..server import GunicornServer, call

EMBED = "cl-nagoya/ruri-v3-310m"  # -> model_dirs["embed"] (st_model)
EMBED_30M = "cl-nagoya/ruri-v3-30m"  # -> model_dirs["embed-short"] (st_short, max_seq_length 16)
RERANK = "cl-nagoya/ruri-v3-reranker-310m"  # -> model_dirs["rerank"] (ce_model)
API_KEY = "sk-embedapi-test-key"
FAULT_CONFIG = Path(__file__).resolve().parent / "gunicorn_fault.conf.py"


def real_names_toml(dirs: dict[str, Path]) -> str:
    return f"""
[[models]]
id = "{EMBED}"
source = "{dirs['embed']}"
kind = "embedding"
dtype = "float32"

[[models]]
id = "{EMBED_30M}"
source = "{dirs['embed-short']}"
kind = "embedding"
dtype = "float32"

[[models]]
id = "{RERANK}"
source = "{dirs['rerank']}"
kind = "rerank"
dtype = "float32"
"""


@pytest.fixture(scope="session")
def real_names_file(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clients-config") / "models.toml"
    path.write_text(real_names_toml(model_dirs), encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def live(real_names_file: Path):
    """The server every client talks to: one worker (test_gunicorn.py covers two), no API keys,
    default limits. Stopped when this package's tests are done."""
    server = GunicornServer(real_names_file, workers=1).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def guarded(real_names_file: Path):
    """One worker with API keys, a tiny queue and a slow forward pass (injected fault), for the
    401 and 429 paths."""
    server = GunicornServer(real_names_file, workers=1, config=FAULT_CONFIG, env={
        "EMBEDAPI_API_KEYS": API_KEY,
        "EMBEDAPI_MAX_QUEUE_TOKENS": "1",
        "EMBEDAPI_TEST_FORWARD_DELAY": "1.0",
    }).start()
    yield server
    server.stop()


def float_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> np.ndarray:
    """The same request as plain float JSON over urllib: the reference the clients must reproduce."""
    status, _, payload = call("POST", url + "/v1/embeddings", {**body, "encoding_format": "float"}, headers=headers)
    assert status == 200, payload
    return np.array([d["embedding"] for d in sorted(payload["data"], key=lambda d: d["index"])], dtype=np.float32)


def st_encode(model, texts: list[str]) -> np.ndarray:
    """SentenceTransformer.encode, normalised (the server returns unit vectors by default)."""
    return np.asarray(model.encode(texts, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32)
