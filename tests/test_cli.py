"""`python -m embedapi config` and `python -m embedapi download`, run as subprocesses (offline: no hub here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EMBED, EMBED_ALIAS, RERANK
from .server import ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("EMBEDAPI_", "HF_", "APP_PORT"))}
    return subprocess.run([sys.executable, "-m", "embedapi", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """An offline Hugging Face cache holding one repo, acme/tiny-embedder, at main = COMMIT."""
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-embedder"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}", encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    return tmp_path / "hf"


def test_config_shows_values_and_where_they_came_from(models_file, tmp_path):
    env = {"EMBEDAPI_MODELS_FILE": str(models_file), "EMBEDAPI_MAX_INPUTS": "77", "EMBEDAPI_API_KEYS": "sk-secret-1",
           "EMBEDAPI_WORKERS": "3", "HF_HOME": str(tmp_path / "hf")}
    out = run("config", env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "sk-secret-1" not in text + out.stderr  # keys are counted, never printed
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert "77" in lines["max_inputs"] and "env EMBEDAPI_MAX_INPUTS" in lines["max_inputs"]
    assert "1000" in lines["max_documents"] and "default (EMBEDAPI_MAX_DOCUMENTS)" in lines["max_documents"]
    assert "1 key(s)" in lines["api_keys"] and "env EMBEDAPI_API_KEYS" in lines["api_keys"]
    assert "auto" in lines["device"] and "default" in lines["device"]
    assert "3" in lines["workers"] and "env EMBEDAPI_WORKERS" in lines["workers"]
    assert f"env EMBEDAPI_MODELS_FILE={models_file}" in text
    for model in (EMBED, RERANK):
        assert model in text
    assert EMBED_ALIAS in text and "local directory" in text and str(tmp_path / "hf") in text

    data = json.loads(run("config", "--json", env=env).stdout)
    assert data["settings"]["max_inputs"] == {"value": 77, "source": "env EMBEDAPI_MAX_INPUTS",
                                              "env": "EMBEDAPI_MAX_INPUTS", "note": ""}
    assert data["settings"]["log_format"]["source"] == "default"
    embed = next(m for m in data["models"] if m["id"] == EMBED)
    assert embed["kind"] == "embedding" and embed["prompt_preset"] == "ruri-v3" and embed["aliases"] == [EMBED_ALIAS]
    assert embed["source_type"] == "local directory" and embed["matryoshka_dimensions"] == [32, 16]
    assert data["huggingface"]["offline"] is True


def test_config_defaults_and_errors():
    out = run("config", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["models_source"] == "built-in defaults"
    assert [m["id"] for m in data["models"]] == ["cl-nagoya/ruri-v3-30m", "cl-nagoya/ruri-v3-310m",
                                                 "cl-nagoya/ruri-v3-reranker-310m"]
    assert all(item["source"] == "default" for item in data["settings"].values())

    bad = run("config", env={"EMBEDAPI_MAX_INPUTS": "many"})
    assert bad.returncode == 2 and "EMBEDAPI_MAX_INPUTS must be an integer" in bad.stderr
    missing = run("config", env={"EMBEDAPI_MODELS_FILE": "/nonexistent/models.toml"})
    assert missing.returncode == 2 and "/nonexistent/models.toml does not exist" in missing.stderr
    assert run("nonsense").returncode == 2


def test_download_local_sources_need_nothing(models_file, tmp_path):
    out = run("download", env={"EMBEDAPI_MODELS_FILE": str(models_file), "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4  # every configured model
    for model in (EMBED, RERANK):
        assert any(line.startswith(f"ok {model}: local, nothing to download") for line in lines), lines
    assert not (tmp_path / "hf").exists()  # nothing was written to the cache
    # Named by alias: the configured model it stands for.
    out = run("download", EMBED_ALIAS, env={"EMBEDAPI_MODELS_FILE": str(models_file)})
    assert out.returncode == 0 and out.stdout.startswith(f"ok {EMBED_ALIAS}: local, nothing to download")


def test_download_convert_prebuilds_the_openvino_conversion_cache(models_file, tmp_path):
    env = {"EMBEDAPI_MODELS_FILE": str(models_file), "EMBEDAPI_CONVERSION_CACHE": str(tmp_path / "ov")}
    out = run("download", "--convert", EMBED, RERANK, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()}
    for model in (EMBED, RERANK):
        assert lines[f"ok {model}"].endswith(f"; OpenVINO conversion cache built under {tmp_path / 'ov'}"), lines
    assert len([p for p in (tmp_path / "ov").iterdir() if (p / "manifest.json").exists()]) == 2
    again = run("download", "--convert", EMBED, env=env, timeout=300)
    assert again.returncode == 0 and "OpenVINO conversion cache hit" in again.stdout, again.stdout + again.stderr
    off = run("download", "--convert", EMBED, env={**env, "EMBEDAPI_CONVERSION_CACHE": "off"}, timeout=300)
    assert off.returncode == 1 and "EMBEDAPI_CONVERSION_CACHE is off" in off.stdout


def test_download_offline_id_not_in_cache_fails_clearly(tmp_path):
    out = run("download", "cl-nagoya/not-in-this-cache", env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 1
    assert "FAILED cl-nagoya/not-in-this-cache" in out.stdout
    assert "not in the Hugging Face cache" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    assert str(tmp_path / "hf") in out.stdout  # says which cache it looked in
    assert "Traceback" not in out.stderr


def test_download_offline_cache_hit_and_revisions(hf_home, tmp_path):
    env = {"HF_HOME": str(hf_home)}
    out = run("download", "acme/tiny-embedder", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"snapshots/{COMMIT}" in out.stdout

    # --revision is honoured: another revision is not in this cache.
    out = run("download", "acme/tiny-embedder", "--revision", "v2", env=env)
    assert out.returncode == 1 and "at revision v2 is not in the Hugging Face cache" in out.stdout

    # A configured model's revision is honoured too; one failure does not hide the other results.
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "tiny"\nsource = "acme/tiny-embedder"\nrevision = "{COMMIT}"\n\n'
                      '[[models]]\nid = "other"\nsource = "acme/tiny-embedder"\nrevision = "v9"\n', encoding="utf-8")
    out = run("download", env={**env, "EMBEDAPI_MODELS_FILE": str(models)})
    assert out.returncode == 1
    assert f"ok tiny: acme/tiny-embedder at revision {COMMIT} is in the cache" in out.stdout
    assert "FAILED other: acme/tiny-embedder at revision v9" in out.stdout


def test_download_missing_local_directory(tmp_path):
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "gone"\nsource = "{tmp_path / "no-such-dir"}"\n', encoding="utf-8")
    out = run("download", env={"EMBEDAPI_MODELS_FILE": str(models)})
    assert out.returncode == 1 and f"the local directory {tmp_path / 'no-such-dir'} does not exist" in out.stdout


def test_cli_never_imports_torch(models_file):
    code = ("import sys; from embedapi.__main__ import main; rc = main(['config', '--json']); "
            "assert 'torch' not in sys.modules and 'sentence_transformers' not in sys.modules; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EMBEDAPI_MODELS_FILE": str(models_file), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def fake_hub():
    """A loopback stand-in for the Hub API that answers every request with the error the test sets."""
    import http.server
    import threading

    state = {"code": "RepoNotFound"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401 if state["code"] == "GatedRepo" else 404)
            self.send_header("X-Error-Code", state["code"])
            self.send_header("X-Error-Message", "stand-in hub")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "stand-in hub"}')

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.mark.parametrize("code, message", [
    ("RepoNotFound", "acme/missing does not exist on the Hugging Face Hub (or it is private: set HF_TOKEN)"),
    ("RevisionNotFound", "acme/missing has no revision 'v1'"),
    ("GatedRepo", "acme/missing at revision v1 is gated: accept its terms on huggingface.co and set HF_TOKEN"),
])
def test_download_explains_what_the_hub_answered(fake_hub, tmp_path, code, message):
    state, endpoint = fake_hub
    state["code"] = code
    out = run("download", "acme/missing", "--revision", "v1",
              env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 1 and f"FAILED acme/missing: {message}" in out.stdout, out.stdout + out.stderr


def test_download_with_the_hub_unreachable(tmp_path):
    from .server import free_port

    out = run("download", "acme/missing", env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
                                               "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert out.returncode == 1
    assert "cannot reach the Hugging Face Hub for acme/missing and it is not in the cache" in out.stdout


def test_config_lists_every_setting():
    """A setting added to Settings but not to the `config` table would be invisible to operators."""
    from dataclasses import fields

    from embedapi.__main__ import SETTINGS_ENV
    from embedapi.config import Settings

    assert {f.name for f in fields(Settings)} - {"models"} <= set(SETTINGS_ENV)
