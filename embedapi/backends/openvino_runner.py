"""The OpenVINO side: a model's transformer exported once (ONNX, dynamic batch and length), cached on disk as
OpenVINO IR, compiled for the CPU in float32 or bfloat16, and checked against torch at every load.

Only the transformer runs in OpenVINO (the embedding model's `model[0].model` with its last_hidden_state, the
reranker's sequence-classification model with its logits); pooling, normalisation and the reranker's
activation stay the sentence-transformers modules, exactly as TorchRunner's traced path runs them. The cache
and the checks are described in docs/backends.md.
"""

from __future__ import annotations

import bisect
import ctypes
import gc
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, MutableMapping, Sequence

import numpy as np
import torch

from ..config import ModelSpec
from ..osthreads import os_thread_name
from . import pytorch

log = logging.getLogger(__name__)

# Bump when what is exported changes (inputs, wrapper, opset, what an entry holds): old entries then no longer
# match. 2: entries hold the torch float32 reference rows of the parity check (reference.npz). 3: and the IR with
# float16 weights that an embedding model's bfloat16 compiles from (model-f16.xml / .bin).
FORMAT = 3
OPSET = 17
FP32_TOLERANCE = 1e-5  # parity: |OpenVINO - torch eager| in float32, relative to the rows' scale (at least 1)
BF16_MIN_COSINE = 0.9999  # embeddings in bfloat16: every row's cosine to torch float32
BF16_MAX_SCORE_DELTA = 2e-3  # rerank in bfloat16: |score - torch float32 score| after the activation
_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
# Around and past ModernBERT's 128-token local window; checked through `run`, as served (so 2 x 300 runs as two
# passes of one row: 3 x 150 is the padded batch past the window).
_CHECK_SHAPES = ((1, 5), (3, 150), (2, 300))
RUNTIME_CACHE_SHAPES = 32  # OpenVINO CPU plugin's kernel cache, in input shapes (its default: 5000)
# Padded tokens (rows x width) per OpenVINO inference: a wider batch runs as several passes of consecutive rows
# (the engine sorts a batch by length). Each stream keeps what it allocated for every input shape it has run,
# more for bigger shapes, and never gives it back (CompiledModel.release_memory corrupts the heap of this
# dynamic-shape model on 2026.4), so small passes keep a worker's memory down; passes of 512 tokens also ran
# 1.01-1.14x as fast as whole batches of 1,600-4,000 tokens (docs/backends.md, docs/benchmarks.md).
PASS_TOKENS = 512
# oneDNN's primitive cache (inside OpenVINO's CPU plugin; 1024 primitives by default) keeps each input shape's
# kernels and buffers, ~0.25 MB a primitive on the 30m shape, so a worker that meets many batch shapes grew by
# hundreds of MB (252 widths: +260 MB anonymous at 1024, +147 at 512, +43 at 128). OpenVINO's own runtime cache
# (RUNTIME_CACHE_SHAPES) still keeps the recent shapes' executors. oneDNN reads the variable once, when the
# plugin first makes a primitive; a value in the environment wins (docs/backends.md).
ONEDNN_CACHE_PRIMITIVES = 128
_ONEDNN_CACHE_VARS = pytorch.ONEDNN_CACHE_VARS
_SKIP_DIRS = {"onnx", "openvino"}  # exports shipped with a hub repo: not what is converted here

# The IR that an embedding model's bfloat16 compiles from: the same graph with its weights stored in float16. From
# the float32 IR the CPU plugin keeps two bfloat16 copies of the weights in the worker's own memory (the constants
# converted at compile, then the fully connected layers' packed weights made at the first inference); from float16
# weights it packs once, from the file's mapping, which `release_mapped` then drops: 310m shape, 1043 -> 591 MB
# anonymous in one process, same speed, token cosine to the float32 IR's bfloat16 output 0.9999997. Rerankers
# (float32 under `auto` on CPU) compile an asked-for bfloat16 from the float32 IR: on the test reranker the float16
# route moved scores by up to 0.00206 against 0.00182, past the 2e-3 check (docs/backends.md).
F16_IR = "model-f16.xml"


def has_f16_ir(kind: str) -> bool:
    """Whether a model of this kind gets the float16-weight IR (written by `export`, picked by `ir_for`)."""
    return kind == "embedding"


def ir_for(entry: Path, dtype: torch.dtype, kind: str) -> Path:
    """The entry's IR that `dtype` compiles from: an embedding model's bfloat16 from float16 weights, the rest
    from float32 ones."""
    return entry / (F16_IR if dtype == torch.bfloat16 and has_f16_ir(kind) else "model.xml")


def available() -> str:
    """'' if the OpenVINO runtime imports, else why not (for the log)."""
    try:
        import openvino  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"{type(exc).__name__}: {exc}"
    return ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def versions() -> dict[str, str]:
    return {d: _version(d) for d in ("torch", "transformers", "sentence-transformers", "onnx", "openvino")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_directory(spec: ModelSpec) -> Path | None:
    """The files the model was loaded from: its local directory, or its snapshot in the Hugging Face cache."""
    local = Path(spec.source).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.source, revision=spec.revision, local_files_only=True))
    except Exception as exc:  # not in the cache in the layout snapshot_download knows
        log.info("%s: no local snapshot found for the conversion cache key (%s)", spec.id, exc)
        return None


def file_digests(directory: Path) -> dict[str, str]:
    """relative path -> content hash of every file of a model. A hub snapshot's files link to blobs/ whose
    names are their hashes (sha256 for LFS files, git's sha1 for the rest): those names, nothing re-read."""
    out: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if any(p.startswith(".") for p in rel.parts) or rel.parts[0] in _SKIP_DIRS or not path.is_file():
            continue
        target = path.resolve()
        if path.is_symlink() and target.parent.name == "blobs":
            out[rel.as_posix()] = target.name
        else:
            out[rel.as_posix()] = _sha256(target)
    return out


def cache_key(spec: ModelSpec, directory: Path | None, names: Sequence[str], output: str) -> str | None:
    """What an exported IR depends on: the model's files (and revision), the exporting and reading libraries'
    versions, the inputs and output. None when the files are not at hand (then nothing is cached). An entry
    holds the IR for both precisions (`ir_for`), so the dtype is not part of the key."""
    if directory is None:
        return None
    material = {"format": FORMAT, "opset": OPSET, "kind": spec.kind, "revision": spec.revision,
                "files": file_digests(directory), "versions": versions(), "inputs": list(names), "output": output}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _entry_name(spec: ModelSpec, key: str) -> str:
    """A readable directory name: the hub id (or the local directory's name) and the key."""
    source = Path(spec.source).name if Path(spec.source).expanduser().is_dir() else spec.source
    return re.sub(r"[^A-Za-z0-9._-]+", "--", source).strip("-.")[:80] + "-" + key[:20]


class ConversionCache:
    """IR files per model under `root`, each entry a directory written whole (temporary directory, then
    rename) with a manifest of its files' sha256, so a partial or corrupt entry is detected and rebuilt."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def lookup(self, name: str, key: str) -> tuple[Path | None, str]:
        """(entry directory if valid, '' or why it is not)."""
        entry = self.root / name
        manifest = entry / "manifest.json"
        if not entry.exists():
            return None, ""
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
            if meta.get("key") != key:
                return None, "its manifest names another key"
            for file, digest in meta["files"].items():
                if _sha256(entry / file) != digest:
                    return None, f"{file} does not match its manifest's sha256"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return entry, ""

    def store(self, name: str, key: str, write: Callable[[Path], None], extra: dict[str, Any]) -> Path:
        """Write an entry with `write(tmp_dir)`; if another process stored a valid one meanwhile, keep theirs."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            write(tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the entry from workers running as another user
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            meta = {"key": key, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    **extra}
            (tmp / "manifest.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            entry = self.root / name
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)  # invalid (lookup said so): replaced
            try:
                os.rename(tmp, entry)
            except OSError:  # another worker renamed its copy first
                found, _ = self.lookup(name, key)
                if found is None:
                    raise
                return found
            return entry
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def export(hf_model: torch.nn.Module, names: tuple[str, ...], output: str, example: dict[str, torch.Tensor],
           directory: Path, f16: bool = False) -> None:
    """The transformer to ONNX (dynamic batch and length; TorchScript-based exporter) and on to OpenVINO IR:
    model.xml + model.bin with the weights in float32 and, with `f16`, the same graph with them in float16
    (model-f16.xml + .bin, see `ir_for`)."""
    import openvino as ov

    onnx_path = directory / "model.onnx"
    axes = {n: {0: "batch", 1: "length"} for n in names}
    axes["output"] = {0: "batch", 1: "length"} if output == "last_hidden_state" else {0: "batch"}
    wrapper = pytorch._Positional(hf_model, names, output).eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings from the transformer's shape checks
        torch.onnx.export(wrapper, tuple(example[n] for n in names), str(onnx_path), input_names=list(names),
                          output_names=["output"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    graph = ov.Core().read_model(str(onnx_path))
    ov.save_model(graph, str(directory / "model.xml"), compress_to_fp16=False)
    if f16:
        ov.save_model(graph, str(directory / F16_IR), compress_to_fp16=True)
    keep = {"model.xml", "model.bin", F16_IR, F16_IR.replace(".xml", ".bin")}
    for leftover in directory.iterdir():
        if leftover.name not in keep:
            leftover.unlink()


class OpenVINORunner:
    """A compiled transformer and the sentence-transformers modules after it; `run` is TorchRunner's.

    OpenVINO threads belong to the compiled model's streams, not to the calling thread: every calling thread
    (the engine's lanes) gets its own InferRequest, so passes run side by side, each on one stream, and the
    GIL is released while a pass runs (InferRequest.infer releases it).
    """

    backend = "openvino"

    def __init__(self, compiled: Any, kind: str, names: tuple[str, ...], tail: list[Any], output_key: str,
                 module_output: str, pad_id: int, token_types: bool, max_seq_length: int, dtype: torch.dtype,
                 cache: str | None, embed: Any = None, hidden_size: int = 0) -> None:
        self.compiled, self.kind, self.names, self.tail = compiled, kind, names, tail
        self.output_key, self.module_output = output_key, module_output
        self.pad_id, self.token_types, self.max_seq_length = pad_id, token_types, max_seq_length
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.default_batch_tokens = pytorch.CPU_BATCH_TOKENS
        self.cache = cache  # "hit" | "built" | "rebuilt" | "off" (not cached: no key or no writable cache)
        self.traced = False  # TorchScript is the torch runner's; kept for the load log and describe()
        # Batches wider than `max_tokens` run on `long` (a TorchRunner) when it is set: the exported attention
        # is materialised (batch x heads x length^2) and kept per shape: +1.4 GB after one 4096-token row on
        # the 30m shape (docs/backends.md).
        self.long: Any = None
        self.max_tokens = 0
        # The torch model's weight files (clean copy-on-write mappings, weight_files): their pages are dropped
        # from the RSS after the load and after the last long batch in flight, and read back from the page
        # cache when touched again, so the float32 weights a long batch reads do not stay in the worker's RSS.
        self.weight_files: list[Path] = []
        self._long_lock = threading.Lock()
        self._long_busy = 0
        # With `embed` (the transformer's input embedding, a torch nn.Embedding) the compiled model takes
        # inputs_embeds: the lookup runs in torch on its weights (memory-mapped from the model's files and
        # shared by workers), so OpenVINO holds no copy of the vocabulary-sized table.
        self.embed = embed
        self._local = threading.local()
        # The modules after the transformer, traced (one GIL hand-off per pass, not one per op); None: eager.
        self._tail_script = pytorch.traced_tail(tail, module_output, output_key, hidden_size) \
            if tail and hidden_size else None

    @property
    def tail_traced(self) -> bool:
        """The modules after the transformer run traced, one call a pass."""
        return self._tail_script is not None

    def _request(self) -> Any:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def inputs(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(padded ids, attention mask, the compiled model's inputs by name) for a batch."""
        ids, mask, types = pytorch.pad_batch(batch, self.pad_id, self.token_types)
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if self.embed is not None:
            with torch.inference_mode():
                arrays["inputs_embeds"] = self.embed(torch.from_numpy(ids)).numpy()
        return ids, mask, {n: arrays[n] for n in self.names}

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(s) for s in batch)
        if self.long is not None and width > self.max_tokens:
            return self._run_long(batch)
        if len(batch) * width <= PASS_TOKENS:
            return self._pass(batch)
        return np.concatenate([self._pass(batch[a:b]) for a, b in pass_bounds([len(s) for s in batch], PASS_TOKENS)])

    def _run_long(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        with self._long_lock:
            self._long_busy += 1
        try:
            return self.long.run(batch)
        finally:
            with self._long_lock:
                self._long_busy -= 1
                last = self._long_busy == 0
            if last:
                self.release_weights()

    def release_weights(self) -> int:
        """Drop the torch weights' file pages from this process's RSS (bytes advised)."""
        return sum(release_mapped(path, private_ok=True) for path in self.weight_files)

    def _pass(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask, feed = self.inputs(batch)
        result = self._request().infer(feed)
        hidden = np.array(result[0], dtype=np.float32, copy=True)  # the request reuses its output buffer
        if not self.tail:
            out = hidden
        elif self._tail_script is not None:
            with torch.inference_mode():
                out = self._tail_script(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(hidden)).numpy()
        else:
            features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                        self.module_output: torch.from_numpy(hidden)}
            with torch.inference_mode():
                for module in self.tail:
                    features = module(features)
            out = features[self.output_key].float().numpy()
        if self.kind == "rerank":
            out = out.reshape(len(batch), -1)[:, 0]
        return np.ascontiguousarray(out, dtype=np.float32)


# A file an entry gets once its IR has passed the float32 parity check (outside the manifest: the entry's files
# are never rewritten, and a new entry starts without it). A bfloat16 start on such an entry compiles bfloat16
# only and checks its fidelity against the stored torch rows; without the file it checks float32 first.
VERIFIED = "float32-verified"


def mark_verified(entry: Path) -> None:
    if (entry / VERIFIED).is_file():
        return
    try:
        (entry / VERIFIED).write_text(json.dumps({"versions": versions()}, sort_keys=True), encoding="utf-8")
    except OSError:  # a read-only cache (a shared volume): float32 is checked at every bfloat16 start instead
        pass


def pass_bounds(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive rows whose padded size (rows x their widest) stays within `budget` tokens; a
    row wider than the budget is a pass of its own."""
    bounds, start, widest = [], 0, 0
    for i, n in enumerate(lengths):
        widest = max(widest, n)
        if i > start and (i - start + 1) * widest > budget:
            bounds.append((start, i))
            start, widest = i, n
    bounds.append((start, len(lengths)))
    return bounds


# What `top -H` and /proc/<pid>/task/*/comm show for OpenVINO's own threads (its streams run the passes, not the
# engine's lanes), so bench/request_path.py counts their CPU as forward passes.
OV_THREAD_NAME = b"embedapi-ov"


class NotConverted(Exception):
    """The model cannot serve on OpenVINO (why is the message); the caller falls back to torch."""


def bound_onednn_cache(env: MutableMapping[str, str] = os.environ) -> bool:
    """Set oneDNN's primitive cache capacity to ONEDNN_CACHE_PRIMITIVES unless the environment sets it. The
    variable is the process's: torch's own oneDNN also reads it if it has not made a primitive yet."""
    return pytorch.default_env(_ONEDNN_CACHE_VARS, ONEDNN_CACHE_PRIMITIVES, env)


trim_heap = pytorch.trim_heap  # an export leaves ~100+ MB of the heap free but mapped


_MADV_DONTNEED = 4  # Linux's value (asm-generic/mman-common.h)


def _maps() -> list[tuple[int, int, str, str]]:
    """(start, end, permissions, path) of this process's file mappings (Linux /proc/self/maps; elsewhere none)."""
    out = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)  # the path (the sixth field) may hold spaces
                if len(parts) == 6 and parts[5].startswith("/"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, parts[1], parts[5]))
    except (OSError, ValueError):
        return []
    return out


def mapped_pages(path: Path, private_ok: bool = False) -> list[tuple[int, int]]:
    """[start, end) of this process's read-only mappings of `path`; with `private_ok` also its writable private
    (copy-on-write) ones, which only `clean_mapping` may vouch for."""
    target = os.path.realpath(path)
    return [(a, b) for a, b, perms, name in _maps()
            if name == target and ("w" not in perms or (private_ok and perms.endswith("p")))]


def smaps_kb(path: Path, field: str) -> int | None:
    """The sum of smaps' `field` (e.g. "Rss", "Anonymous"), in kB, over this process's mappings of `path`; None
    when it maps none (or smaps cannot be read)."""
    target = os.path.realpath(path)
    total, seen, current = 0, False, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                head = line.split(maxsplit=5)
                if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
                    current = len(head) == 6 and head[5].rstrip("\n") == target
                    seen |= current
                elif current and head and head[0] == field + ":":
                    total += int(head[1])
    except (OSError, ValueError):
        return None
    return total if seen else None


def clean_mapping(path: Path) -> bool:
    """Whether this process maps `path` with no page of its own (smaps' Anonymous: 0 kB in every mapping of
    it): a copy-on-write mapping nobody wrote to holds only the file's pages, so dropping them loses nothing."""
    return smaps_kb(path, "Anonymous") == 0


def weight_files(module: torch.nn.Module) -> list[Path]:
    """The files whose mappings hold `module`'s parameters and buffers (safetensors maps the model file and
    torch computes on it when the dtype is the file's), each only if clean_mapping vouches for it."""
    maps = sorted(_maps())
    starts = [m[0] for m in maps]
    found: set[str] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        ptr = tensor.data_ptr()
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and maps[i][0] <= ptr < maps[i][1]:
            found.add(maps[i][3])
    return [Path(name) for name in sorted(found) if clean_mapping(Path(name))]


def release_mapped(path: Path, private_ok: bool = False) -> int:
    """Drop this process's resident pages of its read-only mappings of `path` (madvise MADV_DONTNEED); bytes
    advised. OpenVINO maps the IR's `model.bin` and keeps the mapping for the compiled model's constants, though
    the CPU plugin has packed the transformer's weights into its own memory at compile (float32 on x86: every
    fully connected layer is MLAS's packed GEMM, `gemm_mlas_f32` in get_runtime_model()), so the mapping's pages
    only count in the worker's RSS (40 MB on the 30m shape; the file is ~0.9 GB on 310m). The mapping is
    read-only, so a page touched again (a constant some kernel still reads) is read back from the file
    unchanged; the file's pages stay in the page cache, where the kernel reclaims them (docs/backends.md).
    With `private_ok`, also the copy-on-write mappings of a file `weight_files` found clean (the torch model's
    safetensors, which nothing writes to)."""
    ranges = mapped_pages(path, private_ok)
    if not ranges:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return sum(end - start for start, end in ranges if madvise(start, end - start, _MADV_DONTNEED) == 0)


def _compile(core: Any, xml: Path, dtype: torch.dtype, threads: int, streams: int) -> Any:
    """One stream per pass the engine may run at once (its lanes and spare lane), each on its own InferRequest.
    OpenVINO gives a stream at least one thread and never more streams than threads, so a worker with fewer
    threads than passes gets one thread per stream (oversubscribed, as torch's spare lane is); threads are not
    pinned, as several workers may share the cores. The plugin's per-shape kernel cache is kept small: at its
    default (5000 shapes) a worker seeing many batch shapes grew by hundreds of MB a minute (tests/test_soak.py)."""
    streams = max(1, streams)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _PRECISION[pytorch.dtype_name(dtype)],
                              "NUM_STREAMS": streams, "ENABLE_CPU_PINNING": False,
                              "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = max(threads, streams)
    return core.compile_model(core.read_model(str(xml)), "CPU", config)


def _rows_differ(kind: str, got: np.ndarray, want: np.ndarray, dtype: torch.dtype,
                 act: Callable[[np.ndarray], np.ndarray]) -> str:
    """'' if OpenVINO's rows (`got`) are faithful to torch float32's (`want`), else how they differ."""
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if not np.isfinite(got).all():
        return "non-finite values"
    if dtype == torch.float32:
        scale = max(1.0, float(np.abs(want).max()))
        diff = float(np.abs(got - want).max())
        return "" if diff <= FP32_TOLERANCE * scale else f"max difference {diff:.3g} (scale {scale:.3g})"
    if kind == "rerank":
        delta = float(np.abs(act(got) - act(want)).max())
        return "" if delta <= BF16_MAX_SCORE_DELTA else f"max |score difference| {delta:.3g} > {BF16_MAX_SCORE_DELTA}"
    cos = (got * want).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1), 1e-12)
    return "" if cos.min() >= BF16_MIN_COSINE else f"min row cosine {cos.min():.6f} < {BF16_MIN_COSINE}"


def embedding_of(hf_model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The transformer's input embedding when its forward also takes `inputs_embeds` (Hugging Face's
    convention: the embedding of input_ids), else None (the compiled model then takes input_ids)."""
    try:
        embed = hf_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    accepted = inspect.signature(hf_model.forward).parameters
    return embed if isinstance(embed, torch.nn.Embedding) and "inputs_embeds" in accepted else None


def save_reference(directory: Path, batches: Sequence[Sequence[Sequence[int]]], rows: Sequence[np.ndarray]) -> None:
    """The parity check's batches and torch float32 eager's rows for them, kept in the cache entry (its
    manifest covers the file): a cached start checks OpenVINO against them without running torch."""
    arrays: dict[str, np.ndarray] = {}
    for i, (batch, out) in enumerate(zip(batches, rows)):
        arrays[f"lengths{i}"] = np.array([len(s) for s in batch], dtype=np.int64)
        arrays[f"ids{i}"] = np.array([t for s in batch for t in s], dtype=np.int64)
        arrays[f"rows{i}"] = np.asarray(out, dtype=np.float32)
    np.savez(directory / "reference.npz", **arrays)


def load_reference(entry: Path) -> list[tuple[list[list[int]], np.ndarray]]:
    """(batch, torch float32 rows) for each check batch an entry stores: the check runs on the entry's own
    batches, so they always match its rows."""
    try:
        with np.load(entry / "reference.npz") as data:
            out = []
            for i in range(len(data.files) // 3):
                flat, batch = data[f"ids{i}"].tolist(), []
                for n in data[f"lengths{i}"].tolist():
                    batch.append(flat[:n])
                    flat = flat[n:]
                out.append((batch, data[f"rows{i}"]))
            if not out:
                raise ValueError("it holds no check batches")
    except (OSError, KeyError, ValueError) as exc:
        raise NotConverted(f"the conversion cache entry {entry} has no readable reference rows "
                           f"({type(exc).__name__}: {exc})") from exc
    return out


def convert(model: Any, spec: ModelSpec, dtype: torch.dtype, threads: int, streams: int,
            cache_root: str | None, free_torch: bool = True) -> OpenVINORunner:
    """An OpenVINORunner for a float32 sentence-transformers `model`, from the cache or exported now, checked
    against torch float32 eager's rows (computed at export and kept in the cache entry, so a cached start runs
    no torch forward); NotConverted (with the reason) when it cannot serve faithfully. On success, with
    `free_torch`, the torch copy of the transformer is freed (the tokenizer, its input embedding, which the
    runner looks up in torch, and the modules after it stay)."""
    import openvino as ov

    bound_onednn_cache()
    if pytorch.dtype_name(dtype) not in _PRECISION:
        raise NotConverted(f"dtype {pytorch.dtype_name(dtype)} is not served on OpenVINO (float32 or bfloat16)")
    first = model[0]
    text = getattr(first, "modality_config", {}).get("text", {})
    hf_model, output = getattr(first, "model", None), text.get("method_output_name")
    if hf_model is None or text.get("method") != "forward" or output not in ("last_hidden_state", "logits") or \
            getattr(hf_model.config, "output_hidden_states", False):
        raise NotConverted(f"its first module is not a plain {type(hf_model).__name__} forward")
    reference = pytorch.TorchRunner(model, "cpu", torch.float32, spec.kind, trace=False)
    names = pytorch.input_names(hf_model, reference.token_types)
    embed = embedding_of(hf_model)
    if embed is not None:
        names = tuple("inputs_embeds" if n == "input_ids" else n for n in names)
    vocab = int(getattr(hf_model.config, "vocab_size", 0) or len(model.tokenizer))
    key = cache_key(spec, model_directory(spec), names, output)
    store = ConversionCache(cache_root) if cache_root and key else None
    name = _entry_name(spec, key) if key else ""
    entry, state = None, "off"
    if store is not None:
        entry, why = store.lookup(name, key)
        state = "hit" if entry is not None else ("rebuilt" if why else "built")
        if why:
            log.warning("%s: conversion cache entry %s is invalid (%s); rebuilding it", spec.id, store.root / name, why)

    started = time.monotonic()
    scratch: Path | None = None
    if entry is None:
        check_batches = [pytorch.example_ids(rows, min(width, reference.max_seq_length), vocab, reference.pad_id)
                         for rows, width in _CHECK_SHAPES]
        example_seqs = pytorch.example_ids(2, 24, vocab, reference.pad_id)
        ids, mask, types = pytorch.pad_batch(example_seqs, reference.pad_id, reference.token_types)
        example = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                   "token_type_ids": torch.from_numpy(types if types is not None else np.zeros_like(ids))}
        if embed is not None:
            with torch.inference_mode():
                example["inputs_embeds"] = embed(example["input_ids"]).clone()

        def write(directory: Path) -> None:
            export(hf_model, names, output, example, directory, f16=has_f16_ir(spec.kind))
            save_reference(directory, check_batches, [reference.run(b) for b in check_batches])

        try:
            if store is None:
                raise OSError("no cache")
            entry = store.store(name, key, write, {"model": spec.id, "source": spec.source,
                                                   "revision": spec.revision, "versions": versions()})
        except OSError as exc:
            if store is not None:
                log.warning("%s: cannot write the conversion cache under %s (%s); converting without it",
                            spec.id, store.root, exc)
            state = "off"
            scratch = Path(tempfile.mkdtemp(prefix="embedapi-ov-"))
            write(scratch)
            entry = scratch
        log.info("%s: exported the transformer to OpenVINO in %.1fs (cache %s: %s)", spec.id,
                 time.monotonic() - started, state, entry if scratch is None else "not cached")
    else:
        log.info("%s: OpenVINO conversion cache hit: %s", spec.id, entry)
    try:
        checks = load_reference(entry)
        core = ov.Core()
        make = lambda dt, st: OpenVINORunner(  # noqa: E731
            _compile(core, ir_for(entry, dt, spec.kind), dt, threads, st), spec.kind, names, list(model)[1:],
            reference.output_key, first.module_output_name, reference.pad_id, reference.token_types,
            reference.max_seq_length, dt, state, embed, int(getattr(hf_model.config, "hidden_size", 0) or 0))
        precisions = [torch.float32] if dtype == torch.float32 else [torch.float32, dtype]
        if dtype != torch.float32 and state == "hit" and (entry / VERIFIED).is_file():
            precisions = [dtype]  # the entry passed the float32 check at an earlier load: no float32 compile now
        runner = None
        act = pytorch.activation(model)
        with os_thread_name(OV_THREAD_NAME):  # the plugin's threads, started here, inherit the name
            for dt in precisions:  # float32 parity first (the conversion itself), then the precision's fidelity
                candidate = make(dt, 1 if dt != dtype else streams)
                for batch, want in checks:
                    why = _rows_differ(spec.kind, candidate.run(batch), want, dt, act)
                    if why:
                        raise NotConverted(f"OpenVINO {pytorch.dtype_name(dt)} differs from torch float32 on a "
                                           f"batch of {len(batch)}x{max(len(s) for s in batch)} tokens: {why}")
                if dt == torch.float32 and store is not None and scratch is None:
                    mark_verified(entry)
                runner = candidate
        # After every compile: the checked runners' pages too.
        released = sum(release_mapped(path) for path in {ir_for(entry, dt, spec.kind).with_suffix(".bin")
                                                         for dt in precisions})
        log.info("%s: dropped %.0f MB of the IR's mapped weights from RSS (compiled into the plugin's own memory)",
                 spec.id, released / 2**20)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # compiled models hold their weights: files not needed
    assert runner is not None
    runner.weight_files = weight_files(first)  # before freeing: the input embedding alone may leave a file out
    if free_torch:
        first.model = None  # the torch copy of the transformer: its weights now live in the compiled model
        del hf_model, reference
        gc.collect()
    trim_heap()  # what the export and the checks freed (one process loading 30m uncached: RSS 916 -> 780 MB)
    # What loading touched of the model file's mapping (78 of 105 MB on the 30m shape, at a cached start): the
    # compiled model holds the transformer's weights, the lookup reads only the rows of the tokens it meets.
    released = runner.release_weights()
    log.info("%s: dropped %.0f MB of the torch weights' file pages from RSS", spec.id, released / 2**20)
    return runner
