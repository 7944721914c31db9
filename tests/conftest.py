"""Session fixtures: small Ruri-shaped models built at test time, the app, a live Gunicorn server."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embedapi import create_app  # noqa: E402

from .server import GunicornServer  # noqa: E402
from .synthetic_models import build_test_models  # noqa: E402

EMBED = "test/ruri-v3-tiny"
EMBED_SHORT = "test/ruri-v3-tiny-short"
INSTRUCT = "test/instruct-tiny"
RERANK = "test/ruri-v3-reranker-tiny"
EMBED_ALIAS = "text-embedding-3-small"
SHORT_MAX = 16


def torch_ops_called_from_python(run: Callable[[], object]) -> list[str]:
    """The torch ops (tensor methods and torch functions, not the conversions from and to numpy) that `run()`
    calls from Python: each releases the GIL and must take it back, which under load means waiting for the
    request threads."""
    import torch

    calls: list[str] = []

    def watch(frame, event, arg):
        if event == "c_call" and (isinstance(getattr(arg, "__self__", None), torch.Tensor) or
                                  getattr(arg, "__module__", None) == "torch") \
                and arg.__name__ not in ("numpy", "from_numpy"):
            calls.append(arg.__qualname__)
    sys.setprofile(watch)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip cleanly where torch has no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        why = f"needs a CUDA GPU (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}: none usable here)"
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=why))


def models_toml(dirs: dict[str, Path]) -> str:
    return f"""
[[models]]
id = "{EMBED}"
source = "{dirs['embed']}"
kind = "embedding"
dtype = "float32"
aliases = ["{EMBED_ALIAS}"]
matryoshka_dimensions = [32, 16]

[[models]]
id = "{EMBED_SHORT}"
source = "{dirs['embed-short']}"
dtype = "float32"
max_seq_length = {SHORT_MAX}

[[models]]
id = "{INSTRUCT}"
source = "{dirs['embed']}"
dtype = "float32"
prompts = "none"
instruction_template = "Instruct: {{instruction}}\\nQuery: "

[[models]]
id = "{RERANK}"
source = "{dirs['rerank']}"
kind = "rerank"
dtype = "float32"
"""


@pytest.fixture(scope="session", autouse=True)
def conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenVINO conversions go to a session directory (servers started by tests inherit it), never ~/.cache."""
    path = tmp_path_factory.mktemp("conversion-cache")
    os.environ["EMBEDAPI_CONVERSION_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def models_file(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "models.toml"
    path.write_text(models_toml(model_dirs), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def app(models_file: Path):
    app = create_app({"models_file": str(models_file), "load_models": "sync", "api_keys": (),
                      "max_inputs": 64, "max_documents": 32, "max_text_chars": 5000,
                      "max_body_bytes": 256 * 1024})
    app.config["TESTING"] = True
    yield app
    app.extensions["embedapi"].registry.shutdown()


@pytest.fixture(scope="session")
def st_model(model_dirs: dict[str, Path]):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(model_dirs["embed"]), device="cpu")


@pytest.fixture(scope="session")
def st_short(model_dirs: dict[str, Path]):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(model_dirs["embed-short"]), device="cpu")


@pytest.fixture(scope="session")
def ce_model(model_dirs: dict[str, Path]):
    from sentence_transformers import CrossEncoder
    return CrossEncoder(str(model_dirs["rerank"]), device="cpu")


@pytest.fixture(scope="session")
def gunicorn_server(models_file: Path):
    """Two workers on loopback with the small models; shared by the live-server tests."""
    server = GunicornServer(models_file, workers=2).start()
    yield server
    server.stop()
