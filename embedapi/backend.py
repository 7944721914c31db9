"""The torch side: device and dtype choice, loading, and forward passes on ready token ids.

Only this module imports torch and sentence-transformers. The forward pass feeds the ids the
service already made to the model's own modules, so nothing is tokenized twice and the result
is what `SentenceTransformer.encode` / `CrossEncoder.predict` compute.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Callable, Mapping, Sequence

# torch's intra-op pool is OpenMP (libgomp), whose idle threads spin after every parallel region. When
# anything else wants the cores (this worker's request threads, other processes) the spinning threads
# starve the one that is late: on the shared 2-core test machine a 2-thread forward pass ran 5-10x
# slower, and the server's throughput under 32 clients was ~4x lower than with PASSIVE (README,
# Benchmark). libgomp reads this once, when torch loads, hence before the import; the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20


def tune_malloc(env: Mapping[str, str] = os.environ) -> bool:
    """Stop glibc from returning a forward pass's freed activations to the OS after every batch.

    By default glibc trims the heap top and re-maps mid-sized blocks, so each batch faults its
    activation pages in again: with the 30m shape on 2 cores a third of a core went to the kernel
    and encode ran 1.2-1.5x slower (README, Benchmark). Blocks under 64 MiB now stay in the heap and
    up to 512 MiB of free heap top stays mapped; bigger blocks (a long input's attention) are still
    returned at once. Any MALLOC_* / GLIBC_TUNABLES setting in the environment wins; not glibc: no-op.
    """
    if any(k in env for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                              "GLIBC_TUNABLES")):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols: libc's, without a library search
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


tune_malloc()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .config import ModelSpec
from .errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> str:
    """`auto` → cuda, then mps, then cpu; anything else is checked and returned."""
    requested = requested.strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"EMBEDAPI_DEVICE={requested} but CUDA is not available in this process")
        return requested
    if requested in ("cpu", "mps"):
        return requested
    raise ConfigError(f"EMBEDAPI_DEVICE must be auto, cpu, cuda, cuda:N or mps, not {requested!r}")


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read(200_000)
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """`auto`: bfloat16 where the hardware runs it natively, float16 on older GPUs, else float32."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


CPU_BATCH_TOKENS = 4096
GPU_BATCH_TOKENS = 16384


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_threads(n: int) -> int:
    """Set the worker's torch threads (0: keep torch's choice); return the number in effect."""
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


_local = threading.local()


def use_threads(n: int) -> None:
    """Intra-op threads for the forward passes of the calling thread (OpenMP and MKL keep the count per
    calling thread; torch's global default only seeds threads that have not run an op yet)."""
    if getattr(_local, "threads", None) != n:
        torch.set_num_threads(n)
        _local.threads = n


def default_lanes(device: str, threads: int) -> int:
    """Forward passes side by side: two on a CPU with two threads or more (each on half of them
    under load; README, Benchmark), one on a GPU or a single-thread CPU worker."""
    return 2 if device == "cpu" and threads >= 2 else 1


def load(spec: ModelSpec, device: str) -> Any:
    """Load a configured model with sentence-transformers (hub id, offline cache or local directory)."""
    kwargs: dict[str, Any] = dict(device=device, trust_remote_code=spec.trust_remote_code)
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.kind == "embedding":
        from sentence_transformers import SentenceTransformer
        model = SentenceTransformer(spec.source, **kwargs)
    else:
        from sentence_transformers import CrossEncoder
        model = CrossEncoder(spec.source, **kwargs)
    if spec.max_seq_length:
        model.max_seq_length = spec.max_seq_length
    model.eval()
    return model


def activation(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The reranker's own score activation (Sigmoid for one label), as `CrossEncoder.predict` applies it."""
    fn = getattr(model, "activation_fn", None) or torch.nn.Identity()

    def apply(logits: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return fn(torch.from_numpy(logits)).numpy()
    return apply


def _max_length(model: Any) -> int:
    length = getattr(model, "max_seq_length", None) or getattr(model, "max_length", None)
    if not length:
        length = getattr(model.tokenizer, "model_max_length", 512)
    return int(min(length, 1 << 20))


class TorchRunner:
    """Pads a batch of id sequences and runs it through a sentence-transformers model."""

    def __init__(self, model: Any, device: str, dtype: torch.dtype, kind: str) -> None:
        self.model = model.to(dtype) if dtype != torch.float32 else model
        self.device = torch.device(device)
        self.dtype = dtype
        self.kind = kind
        self.output_key = "sentence_embedding" if kind == "embedding" else "scores"
        tokenizer = model.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.max_seq_length = _max_length(model)
        # The token budget when EMBEDAPI_MAX_BATCH_TOKENS is not set. On CPU, batches past a few thousand
        # padded tokens only grow the activations out of cache: one request of 300 mixed texts ran 1.3-1.4x
        # faster at 4096 than at 16384 (README, Benchmark); GPUs want the big batches.
        self.default_batch_tokens = CPU_BATCH_TOKENS if self.device.type == "cpu" else GPU_BATCH_TOKENS

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        width = max(len(s) for s in batch)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        types = np.zeros((len(batch), width), dtype=np.int64) if self.token_types else None
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
            first = getattr(seq, "first_len", None)
            if types is not None and first is not None:
                types[row, first: len(seq)] = 1
        features = {"input_ids": torch.from_numpy(ids).to(self.device),
                    "attention_mask": torch.from_numpy(mask).to(self.device)}
        if types is not None:
            features["token_type_ids"] = torch.from_numpy(types).to(self.device)
        with torch.inference_mode():
            out = self.model(features)[self.output_key]
        if self.kind == "rerank":
            out = out.reshape(len(batch), -1)[:, 0]
        return out.float().cpu().numpy()

