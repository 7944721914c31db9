"""Backends: OpenVINO through the real loading path (exact in float32, faithful in bfloat16, cached on disk,
rebuilt when corrupt), and torch wherever OpenVINO is missing, unfaithful or not asked for."""

from __future__ import annotations

import json
import os
import logging
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from embedapi import backends
from embedapi.backends import openvino_runner, pytorch
from embedapi.config import ModelSpec, Settings
from embedapi.errors import ConfigError
from embedapi.registry import Registry

from .conftest import EMBED, RERANK, torch_ops_called_from_python

TEXTS = ["今日は良い天気です。", "名古屋大学で開発された日本語の埋め込みモデル。" * 4,
         "川沿いの道を歩いて図書館まで行きました。" * 12]  # ~10 to ~250 tokens: past the 128-token window
QUERY = "図書館はどこですか？"


def _registry(model_dirs: dict[str, Path], cache: Path, dtype: str, tmp: Path) -> Registry:
    models = tmp / f"models-{dtype}.toml"
    models.write_text(f"""
[[models]]
id = "{EMBED}"
source = "{model_dirs['embed']}"
dtype = "{dtype}"
backend = "openvino"

[[models]]
id = "{RERANK}"
source = "{model_dirs['rerank']}"
kind = "rerank"
dtype = "{dtype}"
backend = "openvino"
""", encoding="utf-8")
    registry = Registry(Settings.from_env({}, models_file=str(models), conversion_cache=str(cache)))
    registry.load_all("cpu", threads=2)
    return registry


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def f32(model_dirs, cache, tmp_path_factory):
    registry = _registry(model_dirs, cache, "float32", tmp_path_factory.mktemp("f32"))
    yield registry
    registry.shutdown()


def _embed(registry: Registry, texts: list[str]) -> np.ndarray:
    loaded = registry.models[EMBED]
    return loaded.engine.submit([loaded.encoder.single(i) for i in loaded.encoder.ids(texts)]).wait(60)


def _scores(registry: Registry, query: str, docs: list[str]) -> np.ndarray:
    loaded = registry.models[RERANK]
    ids = loaded.encoder.ids([query, *docs])
    logits = loaded.engine.submit([loaded.encoder.pair(ids[0], d) for d in ids[1:]]).wait(60)
    return loaded.activation(logits)


def test_float32_on_openvino_is_encode_and_predict(f32, st_model, ce_model):
    assert {m.backend for m in f32.models.values()} == {"openvino"}
    assert {m.engine.runner.cache for m in f32.models.values()} == {"built"}  # a fresh cache directory
    want = st_model.encode(TEXTS, batch_size=len(TEXTS), normalize_embeddings=False)
    np.testing.assert_allclose(_embed(f32, TEXTS), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_scores(f32, QUERY, TEXTS), ce_model.predict([(QUERY, t) for t in TEXTS]),
                               rtol=0, atol=1e-5)
    assert {d["id"]: (d["backend"], d["dtype"]) for d in f32.describe()} == {
        EMBED: ("openvino", "float32"), RERANK: ("openvino", "float32")}


def test_batches_wider_than_the_openvino_limit_run_on_torch_and_are_still_encode(f32, st_model):
    runner = f32.models[EMBED].engine.runner.inner
    assert runner.max_tokens == 512 and runner.long.backend == "torch" and not runner.long.traced  # eager: as fast
    assert runner.long.autocast is None and runner.long.dtype == torch.float32
    texts = ["川沿いの道を歩いて図書館まで行きました。" * 60, TEXTS[0]]  # ~1200 tokens: over the limit
    assert len(st_model.tokenizer(texts[0])["input_ids"]) > 512
    want = st_model.encode(texts, batch_size=2, normalize_embeddings=False)
    np.testing.assert_allclose(_embed(f32, texts), want, rtol=0, atol=1e-5)


def test_a_batch_over_the_pass_budget_runs_as_several_passes_and_is_still_encode(f32, st_model, monkeypatch):
    """OpenVINO keeps what each stream allocated for every shape it ran, more for bigger ones: big batches run in
    passes of at most PASS_TOKENS padded tokens, consecutive rows each, and give the same rows as one encode."""
    runner = f32.models[EMBED].engine.runner.inner
    passes: list[tuple[int, int]] = []
    whole = runner._pass

    def counted(batch):
        passes.append((len(batch), max(len(s) for s in batch)))
        return whole(batch)

    monkeypatch.setattr(runner, "_pass", counted)
    texts = [TEXTS[i % 2] * (1 + i % 3) for i in range(40)]
    loaded = f32.models[EMBED]
    seqs = [loaded.encoder.single(i) for i in loaded.encoder.ids(texts)]
    order = sorted(range(len(texts)), key=lambda i: len(seqs[i]))  # as the engine sorts a batch
    batch = [seqs[i] for i in order]
    assert len(batch) * len(batch[-1]) > openvino_runner.PASS_TOKENS
    got = runner.run(batch)
    assert len(passes) > 1 and sum(n for n, _ in passes) == len(batch)
    assert all(n * w <= openvino_runner.PASS_TOKENS for n, w in passes)
    want = st_model.encode([texts[i] for i in order], batch_size=len(texts), normalize_embeddings=False)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pass_bounds_keep_consecutive_rows_within_the_budget():
    assert openvino_runner.pass_bounds([10] * 100, 512) == [(0, 51), (51, 100)]
    assert openvino_runner.pass_bounds([5, 5, 100, 300, 600, 20], 512) == [(0, 3), (3, 4), (4, 5), (5, 6)]
    assert openvino_runner.pass_bounds([7], 512) == [(0, 1)]


def test_bfloat16_keeps_cosine_and_scores_and_reuses_the_float32_conversion(f32, model_dirs, cache, st_model,
                                                                             ce_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        registry = _registry(model_dirs, cache, "bfloat16", tmp_path)
    try:
        # An entry holds the IR for both precisions, compiled at load: the second load is a cache hit.
        assert {m.engine.runner.cache for m in registry.models.values()} == {"hit"}
        assert "conversion cache hit" in caplog.text and "exported the transformer" not in caplog.text
        assert registry.models[EMBED].dtype == "bfloat16"
        got = _embed(registry, TEXTS)
        want = st_model.encode(TEXTS, batch_size=len(TEXTS), normalize_embeddings=False)
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.9999
        delta = np.abs(_scores(registry, QUERY, TEXTS) - ce_model.predict([(QUERY, t) for t in TEXTS]))
        assert delta.max() <= 2e-3
    finally:
        registry.shutdown()


def test_long_bfloat16_batches_run_under_autocast_on_the_float32_weights_kept_off_the_rss(model_dirs, cache,
                                                                                         st_model, tmp_path):
    """Batches past the OpenVINO limit run on the float32 model the conversion loaded, its weights on the model
    file's mapping, under bfloat16 autocast: no second copy of the weights, and their pages leave the RSS after
    the load and after each long batch (read back unchanged when touched again)."""
    registry = _registry(model_dirs, cache, "bfloat16", tmp_path)
    try:
        runner = registry.models[EMBED].engine.runner.inner
        long = runner.long
        assert long.autocast == torch.bfloat16 and {p.dtype for p in long.model.parameters()} == {torch.float32}
        (weights,) = runner.weight_files
        assert weights.name == "model.safetensors" and weights.parent.name == "embed"
        texts = ["川沿いの道を歩いて図書館まで行きました。" * 60, TEXTS[1]]  # ~1200 tokens: past the limit
        want = st_model.encode(texts, batch_size=2, normalize_embeddings=False)
        first = _embed(registry, texts)
        assert openvino_runner.smaps_kb(weights, "Rss") < 64  # kB: released after the batch (at most a few pages since)
        again = _embed(registry, texts)
        np.testing.assert_array_equal(first, again)  # the pages read back are the file's
        cos = (first * want).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.9999
    finally:
        registry.shutdown()


def _load(model_dirs, cache: Path | None, requested: str = "openvino", kind: str = "embedding") -> backends.Loaded:
    spec = ModelSpec(id="t", source=str(model_dirs["embed" if kind == "embedding" else "rerank"]), kind=kind,
                     dtype="float32")
    return backends.load_runner(spec, "cpu", requested, trace=False, threads=1, streams=1,
                                cache_root=str(cache) if cache else None)


def _entry(cache: Path, name: str) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.name.startswith(name + "-")]
    return entry


@pytest.mark.parametrize("damage", ["truncate the weights", "edit the manifest"])
def test_a_corrupt_cache_entry_is_rebuilt(f32, model_dirs, cache, st_model, caplog, damage):
    entry = _entry(cache, "embed")
    if damage == "truncate the weights":
        # A new, shorter file in its place (as a copy cut short would leave): loaded models map the old one, and
        # cutting a mapped file short under them would crash them (SIGBUS), so nothing writes entries in place.
        weights, cut = entry / "model.bin", entry / "model.bin.cut"
        cut.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        cut.replace(weights)
    else:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
        manifest["files"]["model.xml"] = "0" * 64
        (entry / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.openvino_runner"):
        loaded = _load(model_dirs, cache)
    assert loaded.backend == "openvino" and loaded.runner.cache == "rebuilt"
    assert "is invalid" in caplog.text and "rebuilding it" in caplog.text
    ids = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]
    np.testing.assert_allclose(loaded.runner.run(ids), st_model.encode(TEXTS, normalize_embeddings=False),
                               rtol=0, atol=1e-5)
    assert _load(model_dirs, cache).runner.cache == "hit"  # and whole again


def test_without_openvino_auto_serves_on_torch_and_explicit_openvino_is_a_config_error(model_dirs, monkeypatch,
                                                                                      caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    with caplog.at_level(logging.WARNING, logger="embedapi.backends"):
        loaded = _load(model_dirs, None, "auto", "rerank")
    assert loaded.backend == "torch" and isinstance(loaded.runner, pytorch.TorchRunner)
    assert "serving on torch, not OpenVINO: OpenVINO is not importable" in caplog.text
    with pytest.raises(ConfigError, match='backend = "openvino" cannot serve it: OpenVINO is not importable'):
        _load(model_dirs, None, "openvino")


def test_a_cached_start_checks_against_the_stored_torch_rows_without_a_torch_forward(f32, model_dirs, cache,
                                                                                    st_model, monkeypatch):
    entry = _entry(cache, "embed")
    assert "reference.npz" in json.loads((entry / "manifest.json").read_text(encoding="utf-8"))["files"]

    def no_torch(self, batch):
        raise AssertionError("a torch forward at a cached start")

    monkeypatch.setattr(pytorch.TorchRunner, "run", no_torch)
    loaded = _load(model_dirs, cache)
    assert loaded.backend == "openvino" and loaded.runner.cache == "hit"
    # The vocabulary-sized embedding table stays torch's (memory-mapped): the compiled model takes its output.
    assert loaded.runner.names[0] == "inputs_embeds" and loaded.runner.embed is not None
    monkeypatch.undo()
    ids = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]
    np.testing.assert_allclose(loaded.runner.run(ids), st_model.encode(TEXTS, normalize_embeddings=False),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("cached", [False, True], ids=["no cache", "cache hit"])
def test_a_failing_parity_check_serves_on_torch(f32, model_dirs, cache, st_model, monkeypatch, caplog, cached):
    real = openvino_runner.OpenVINORunner.run
    monkeypatch.setattr(openvino_runner.OpenVINORunner, "run", lambda self, batch: real(self, batch) + 1e-3)
    with caplog.at_level(logging.WARNING, logger="embedapi.backends"):
        loaded = _load(model_dirs, cache if cached else None, "auto")
    assert loaded.backend == "torch" and not loaded.runner.traced  # trace=False asked for
    assert "OpenVINO float32 differs from torch float32 on a batch of 1x5 tokens: max difference" in caplog.text
    ids = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]
    np.testing.assert_allclose(loaded.runner.run(ids), st_model.encode(TEXTS, normalize_embeddings=False),
                               rtol=0, atol=1e-6)


def test_backend_choice_by_device_and_dtype():
    assert backends.choose("auto", "cpu", "float32", "m") == backends.choose("auto", "cpu", "bfloat16", "m") == \
        "openvino"
    assert backends.choose("auto", "cuda:0", "bfloat16", "m") == backends.choose("auto", "mps", "float32", "m") == \
        "torch"  # every GPU path stays torch
    assert backends.choose("auto", "cpu", "float16", "m") == backends.choose("torch", "cpu", "float32", "m") == \
        "torch"
    with pytest.raises(ConfigError, match='m: backend = "openvino" runs on the CPU only.*EMBEDAPI_DEVICE=cpu'):
        backends.choose("openvino", "cuda:0", "bfloat16", "m")
    with pytest.raises(ConfigError, match="serves dtype float32 or bfloat16, not float16"):
        backends.choose("openvino", "cpu", "float16", "m")


def test_cpu_rerankers_stay_float32_under_auto_and_gpus_keep_their_choice(monkeypatch):
    monkeypatch.setattr(pytorch, "cpu_has_native_bf16", lambda: True)
    assert pytorch.pick_dtype("auto", "cpu", "embedding") is pytorch.torch.bfloat16
    assert pytorch.pick_dtype("auto", "cpu", "rerank") is pytorch.torch.float32  # bfloat16 moved scores > 2e-3
    assert pytorch.pick_dtype("bfloat16", "cpu", "rerank") is pytorch.torch.bfloat16  # asked for: as asked
    monkeypatch.setattr(pytorch, "cuda_capability", lambda device: (8, 0))
    monkeypatch.setattr(pytorch.torch.version, "hip", None)
    assert pytorch.pick_dtype("auto", "cuda:0", "rerank") is pytorch.torch.bfloat16  # the GPU path unchanged


def test_backend_settings_are_validated_and_the_entry_wins(tmp_path):
    with pytest.raises(ConfigError, match="EMBEDAPI_BACKEND must be one of auto, torch, openvino, not 'onnx'"):
        Settings.from_env({"EMBEDAPI_BACKEND": "onnx"})
    with pytest.raises(ConfigError, match=r"#1: backend must be one of \('auto', 'torch', 'openvino'\), not 'ov'"):
        ModelSpec.from_mapping({"id": "m", "backend": "ov"}, "#1")
    assert ModelSpec.from_mapping({"id": "m"}, "#1").backend is None  # EMBEDAPI_BACKEND decides
    assert Settings.from_env({"HF_HOME": "/cache/huggingface"}).conversion_cache == "/cache/huggingface/embedapi/openvino"
    assert Settings.from_env({"EMBEDAPI_CONVERSION_CACHE": "/x"}).conversion_cache == "/x"


def test_models_say_which_backend_serves_them(app):
    data = app.test_client().get("/v1/models").json["data"]
    default = Settings.from_env({}).backend  # torch until OpenVINO's memory stays bounded (docs/backends.md)
    want = "openvino" if default == "auto" else default
    assert {(m["backend"], m["dtype"]) for m in data} == {(want, "float32")}


def test_an_openvino_pass_releases_the_gil(f32):
    """A Python thread keeps counting while a pass runs in another: InferRequest.infer does not hold the GIL."""
    runner = f32.models[EMBED].engine.runner.inner
    _, _, feed = runner.inputs([list(range(10, 1200))] * 4)
    request = runner._request()  # this thread's own, as each lane has
    request.infer(feed)
    done, box = threading.Event(), [0]

    def count() -> None:
        while not done.is_set():
            box[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.2)  # the interpreter hands a held GIL over only after 0.2 s: not during one pass
    worker = threading.Thread(target=count)
    try:
        worker.start()
        before = box[0]
        request.infer(feed)
        during = box[0] - before  # if infer held the GIL, `count` could not have run meanwhile
    finally:
        done.set()
        worker.join()
        sys.setswitchinterval(interval)
    assert during > 1000


def test_the_pooling_after_openvino_runs_traced_in_one_call(f32, st_model, monkeypatch):
    """The sentence-transformers modules after the compiled transformer run as one traced call: a pass calls
    no torch op from Python but the input-embedding lookup. Eager, they give the same rows."""
    runner = f32.models[EMBED].engine.runner.inner
    assert runner.tail_traced
    ids = [st_model.tokenizer(t)["input_ids"] for t in TEXTS]
    traced = runner.run(ids)
    # per pass, the lookup's torch.embedding (and F.embedding's weight.size() check): nothing of the pooling
    assert set(torch_ops_called_from_python(lambda: runner.run(ids))) == {"_VariableFunctionsClass.embedding",
                                                                          "Parameter.size"}
    monkeypatch.setattr(runner, "_tail_script", None)
    np.testing.assert_allclose(runner.run(ids), traced, rtol=0, atol=1e-6)
    np.testing.assert_allclose(traced, st_model.encode(TEXTS, batch_size=len(TEXTS), normalize_embeddings=False),
                               rtol=0, atol=1e-5)


class _ShapeBound(torch.nn.Module):
    """Pooling whose Python branches on the width: a trace keeps the branch of its example's width only."""

    def forward(self, features: dict) -> dict:
        hidden = features["token_embeddings"]
        features["sentence_embedding"] = hidden[:, 0] if hidden.shape[1] > 100 else hidden.mean(1)
        return features


def test_modules_after_openvino_that_do_not_trace_faithfully_run_eager(st_model, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        assert pytorch.traced_tail([_ShapeBound()], "token_embeddings", "sentence_embedding", 8) is None
    assert "differ from the eager ones on a batch of (3, 150)" in caplog.text
    pooling, width = list(st_model)[1:], st_model.get_embedding_dimension()
    assert pytorch.traced_tail(pooling, "token_embeddings", "sentence_embedding", width) is not None

    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded")
    monkeypatch.setattr(pytorch.torch.jit, "trace", broken)
    with caplog.at_level(logging.WARNING, logger="embedapi.backends.pytorch"):
        assert pytorch.traced_tail(pooling, "token_embeddings", "sentence_embedding", width) is None
    assert "run eager (RuntimeError: tracer exploded)" in caplog.text


def test_openvinos_threads_are_named_for_top_and_the_benchmark(f32):
    """The plugin's threads, started while the model loads, are `embedapi-ov` (bench/request_path.py counts them
    as forward passes); the loading thread gets its own name back."""
    from embedapi.backends.openvino_runner import OV_THREAD_NAME
    from embedapi.osthreads import os_thread_name

    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    assert OV_THREAD_NAME.decode() in names
    own = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
    before = own.read_text()
    with os_thread_name(b"embedapi-test"):
        assert own.read_text().strip() == "embedapi-test"
    assert own.read_text() == before


def test_a_bfloat16_start_on_a_float32_verified_entry_compiles_bfloat16_only(f32, model_dirs, cache, monkeypatch):
    """The float32 parity check marks the entry once; a later bfloat16 start on it skips the float32 compile
    (its fidelity check against the stored torch rows still runs). Without the mark, float32 is checked first."""
    entry = _entry(cache, "embed")
    assert (entry / openvino_runner.VERIFIED).is_file()  # the float32 loads above passed the check on it
    files = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))["files"]
    assert {openvino_runner.F16_IR, openvino_runner.F16_IR.replace(".xml", ".bin")} <= set(files)
    compiled, irs = [], []
    real = openvino_runner._compile

    def spy(core, xml, dtype, threads, streams):
        compiled.append(pytorch.dtype_name(dtype))
        irs.append(xml.name)
        return real(core, xml, dtype, threads, streams)

    monkeypatch.setattr(openvino_runner, "_compile", spy)
    spec = ModelSpec(id="t", source=str(model_dirs["embed"]), kind="embedding", dtype="bfloat16")
    loaded = backends.load_runner(spec, "cpu", "openvino", trace=False, threads=1, streams=1, cache_root=str(cache))
    assert loaded.backend == "openvino" and loaded.runner.cache == "hit" and compiled == ["bfloat16"]
    # bfloat16 compiles from the float16-weight IR (one copy of the weights in the plugin, not two).
    assert irs == [openvino_runner.F16_IR]

    (entry / openvino_runner.VERIFIED).unlink()
    compiled.clear()
    irs.clear()
    loaded = backends.load_runner(spec, "cpu", "openvino", trace=False, threads=1, streams=1, cache_root=str(cache))
    assert loaded.backend == "openvino" and compiled == ["float32", "bfloat16"]
    assert irs == ["model.xml", openvino_runner.F16_IR]
    assert (entry / openvino_runner.VERIFIED).is_file()


def test_onednns_primitive_cache_is_bounded_unless_the_environment_sets_it(f32):
    """oneDNN's default cache (1024 primitives) kept hundreds of MB of per-shape kernels and buffers
    (docs/backends.md); the load bounds it before the plugin makes its first primitive, and a user's value wins."""
    import os

    assert any(v in os.environ for v in openvino_runner._ONEDNN_CACHE_VARS)  # set by the loads of `f32`
    env: dict[str, str] = {}
    assert openvino_runner.bound_onednn_cache(env)
    assert env == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(openvino_runner.ONEDNN_CACHE_PRIMITIVES)}
    for name in openvino_runner._ONEDNN_CACHE_VARS:
        env = {name: "1024"}
        assert not openvino_runner.bound_onednn_cache(env)
        assert env == {name: "1024"}
    openvino_runner.trim_heap()  # glibc's malloc_trim, or nothing: never raises


def _resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """Resident bytes of this process's mappings that start at the given addresses (/proc/self/smaps)."""
    starts, total, current = {start for start, _ in ranges}, 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in starts
            elif head == "Rss:" and current:
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux's")
def test_the_irs_mapped_weights_leave_the_rss_once_compiled_and_still_serve(f32, model_dirs, cache, st_model, caplog):
    """OpenVINO keeps the IR's model.bin mapped although the CPU plugin compiled the weights into its own memory:
    the load drops the mapping's resident pages (read-only, so a page touched again is read back unchanged)."""
    bin_path = _entry(cache, "embed") / "model.bin"
    before = set(openvino_runner.mapped_pages(bin_path))
    with caplog.at_level(logging.INFO, logger="embedapi.backends.openvino_runner"):
        loaded = _load(model_dirs, cache)
    assert loaded.backend == "openvino" and loaded.runner.cache == "hit"
    new = [r for r in openvino_runner.mapped_pages(bin_path) if r not in before]
    assert new, "the compiled model keeps its mapping of the IR"
    assert _resident_bytes(new) <= bin_path.stat().st_size // 10
    assert "of the IR's mapped weights from RSS" in caplog.text
    ids = loaded.model.tokenizer(TEXTS)["input_ids"]
    got = loaded.runner.run(sorted(ids, key=len, reverse=True))
    want = st_model.encode(sorted(TEXTS, key=lambda t: -len(loaded.model.tokenizer(t)["input_ids"])),
                           normalize_embeddings=False)
    assert np.abs(got - want).max() < 1e-5
    assert openvino_runner.release_mapped(bin_path.parent / "no-such-file") == 0
