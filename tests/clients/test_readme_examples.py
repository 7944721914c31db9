"""Every curl and Python example in README.md and docs/clients.md, run as written against the live server.

The examples are read from those files at test time: fenced ```bash blocks whose command starts with
`curl`, run by bash with the system curl, with only `http://localhost:8000` replaced by the test
server's URL and `-w` appended to learn the status (where curl is not installed, the command is parsed
with shlex and replayed with requests). Python blocks that name the server's URL run in a subprocess and
must print the embedding dimension (or, for a rerank example, its top_n). An edit that breaks an example
fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..server import ROOT
from .conftest import EMBED, EMBED_30M, RERANK

README = ROOT / "README.md"
CLIENTS = ROOT / "docs" / "clients.md"
DOC_FILES = (README, CLIENTS)
DOC_URL = "http://localhost:8000"


def fenced_blocks(language: str, files=DOC_FILES) -> list[str]:
    return [block for file in files
            for block in re.findall(rf"^```{language}\n(.*?)^```", file.read_text(encoding="utf-8"), flags=re.S | re.M)]


CURL_EXAMPLES = [block.strip() for block in fenced_blocks("bash") if block.lstrip().startswith("curl")]
README_CURL = [block.strip() for block in fenced_blocks("bash", (README,)) if block.lstrip().startswith("curl")]


def route(example: str) -> str:
    return re.search(rf"{re.escape(DOC_URL)}(/\S*)", example).group(1)


def test_the_readme_has_the_examples_this_file_checks():
    assert [route(e) for e in README_CURL] == ["/v1/embeddings"]  # the README keeps one curl example
    assert {"/v1/embeddings", "/v1/rerank", "/v2/rerank", "/v1/models"} <= {route(e) for e in CURL_EXAMPLES}
    assert len(CURL_EXAMPLES) >= 4
    assert {route(e) for e in CURL_EXAMPLES} <= set(SHAPES), "a new README curl example needs a shape check here"


def check_embeddings(request: dict, body: dict) -> None:
    assert body["object"] == "list" and body["model"] == request["model"]
    n = 1 if isinstance(request["input"], str) else len(request["input"])
    assert [d["index"] for d in body["data"]] == list(range(n))
    assert all(d["object"] == "embedding" and len(d["embedding"]) > 0 for d in body["data"])
    assert all(isinstance(x, float) for x in body["data"][0]["embedding"])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def check_rerank_v1(request: dict, body: dict) -> None:
    assert body["id"].startswith("rerank-") and body["model"] == request["model"]
    assert body["query"] == request["query"]
    n = min(request.get("top_n") or len(request["documents"]), len(request["documents"]))
    results = body["results"]
    assert len(results) == n and body["data"] == results
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    for r in results:
        if request.get("return_documents"):
            assert r["document"] == {"text": request["documents"][r["index"]]}
        else:
            assert "document" not in r
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def check_rerank_v2(request: dict, body: dict) -> None:
    assert body["id"]
    n = min(request.get("top_n") or len(request["documents"]), len(request["documents"]))
    assert len(body["results"]) == n
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    assert body["meta"]["billed_units"]["search_units"] == 1 and body["meta"]["tokens"]["input_tokens"] > 0


def check_models(request: None, body: dict) -> None:
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert set(models) == {EMBED, EMBED_30M, RERANK}
    for m in models.values():
        assert {"kind", "dimensions", "max_tokens", "prompt_preset", "aliases", "device", "dtype"} <= set(m)
    assert models[EMBED]["kind"] == "embedding" and models[EMBED]["dimensions"] > 0
    assert models[RERANK]["kind"] == "rerank"


SHAPES = {
    "/v1/embeddings": check_embeddings,
    "/v1/rerank": check_rerank_v1,
    "/v2/rerank": check_rerank_v2,
    "/v1/models": check_models,
}


def request_body(example: str) -> dict | None:
    match = re.search(r"-d '(.*?)'", example, flags=re.S)
    return json.loads(match.group(1)) if match else None


def run_with_curl(command: str) -> tuple[int, str]:
    done = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    payload, _, status = done.stdout.rpartition("\n")
    return int(status), payload


def replay_with_requests(command: str) -> tuple[int, str]:
    """Where curl is missing: parse the command with shlex and send the same request with requests
    (curl -d means POST with Content-Type application/x-www-form-urlencoded unless -H says otherwise)."""
    import requests

    args = shlex.split(command.replace("\\\n", " "))
    assert args[0] == "curl"
    url, headers, data, method = None, {}, None, "GET"
    i = 1
    while i < len(args):
        arg = args[i]
        if arg in ("-H", "--header"):
            name, _, value = args[i + 1].partition(":")
            headers[name.strip()] = value.strip()
            i += 1
        elif arg in ("-d", "--data", "--data-raw"):
            data, method = args[i + 1].encode(), "POST"
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            i += 1
        elif arg in ("-X", "--request"):
            method = args[i + 1]
            i += 1
        elif not arg.startswith("-"):
            url = arg
        i += 1
    response = requests.request(method, url, headers=headers, data=data, timeout=120)
    return response.status_code, response.text


def documented_response(example: str) -> str | None:
    """The ```json block that follows a curl example in its section (before the next ```bash block or
    heading), if any."""
    text = next(t for t in (f.read_text(encoding="utf-8") for f in DOC_FILES) if example in t)
    after = text[text.index(example) + len(example):]
    for end in ("```bash", "\n#"):
        after = after.split(end, 1)[0]
    match = re.search(r"^```json\n(.*?)^```", after, flags=re.S | re.M)
    return match.group(1) if match else None


def all_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in all_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in all_keys(v)}
    return set()


@pytest.mark.parametrize("example", CURL_EXAMPLES, ids=[route(e) for e in CURL_EXAMPLES])
def test_curl_example(live, example):
    command = example.replace(DOC_URL, live.url)
    status, payload = run_with_curl(command) if shutil.which("curl") else replay_with_requests(command)
    assert status == 200, payload
    body = json.loads(payload)
    SHAPES[route(example)](request_body(example), body)
    documented = documented_response(example)
    if documented is not None:  # every field the README shows in the answer is really there
        assert set(re.findall(r'"(\w+)":', documented)) <= all_keys(body)


@pytest.mark.parametrize("example", CURL_EXAMPLES, ids=[route(e) for e in CURL_EXAMPLES])
def test_the_requests_replay_matches_curl(live, example):
    """The fallback used where curl is missing sends what curl sends (checked here, where curl exists)."""
    if not shutil.which("curl"):
        pytest.skip("curl is not installed: nothing to compare the replay with")
    command = example.replace(DOC_URL, live.url)
    (s1, p1), (s2, p2) = run_with_curl(command), replay_with_requests(command)
    b1, b2 = json.loads(p1), json.loads(p2)
    b1.pop("id", None), b2.pop("id", None)
    assert s1 == s2 == 200 and b1 == b2


PYTHON_EXAMPLES = [block for block in fenced_blocks("python") if DOC_URL in block]


def example_id(example: str) -> str:
    imported = re.search(r"^(?:from|import) (\w+)", example, flags=re.M)
    return f"python-{PYTHON_EXAMPLES.index(example)}-{imported.group(1) if imported else 'plain'}"


@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=[example_id(e) for e in PYTHON_EXAMPLES])
def test_python_example(live, example, st_model):
    done = subprocess.run([sys.executable, "-c", example.replace(DOC_URL, live.url)], capture_output=True,
                          text=True, timeout=120, cwd=Path(ROOT))
    assert done.returncode == 0, done.stderr
    top_n = re.search(r"\brerank\(.*top_n=(\d+)", example, flags=re.S)
    want = top_n.group(1) if top_n else str(st_model.get_embedding_dimension())
    assert done.stdout.strip() == want


def test_there_is_a_python_sdk_example():
    assert [e for e in fenced_blocks("python", (README,)) if DOC_URL in e and "from openai import OpenAI" in e]
    assert {"openai", "langchain_openai", "llama_index", "cohere"} <= {example_id(e).split("-", 2)[2]
                                                                    for e in PYTHON_EXAMPLES}
