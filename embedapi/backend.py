"""The torch side: device and dtype choice, loading, and forward passes on ready token ids.

Only this module imports torch and sentence-transformers. The forward pass feeds the ids the
service already made to the model's own modules, so nothing is tokenized twice and the result
is what `SentenceTransformer.encode` / `CrossEncoder.predict` compute. On CPU the transformer is
traced to TorchScript at load (checked against the eager model, else left eager), so a pass runs
without the GIL (see `TorchRunner`).
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
import threading
import warnings
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


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16 is emulated and slow."""
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
    if device == "cpu" and cpu_has_native_bf16():
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


_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class ContiguousInput(torch.nn.Module):
    """An activation applied to a contiguous copy of its input: the same function, a faster kernel.

    ModernBERT's MLP splits one projection in two (`chunk`) and applies GELU to the first half, a
    strided view; on CPU torch runs GELU on such a view up to 2x slower than on a contiguous copy (GELU
    and the gating product at 400 rows x 1024, copy included: bfloat16 864 -> 630 us, float32 840 ->
    743 us). In the server under 32 clients that was worth +0-18 % in bfloat16 (7 paired runs) and 1-14 %
    less in float32 (4 paired runs), so runners use it for bfloat16 only (README, Benchmark). The two
    kernels round erf apart by a few float32 ulps (<= 3e-6 there); bfloat16 vectors came out bit-identical.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.contiguous())


def contiguous_activations(model: torch.nn.Module) -> int:
    """Wrap the activation of every ModernBERT MLP in `model` in ContiguousInput (once); return how many."""
    wrapped = 0
    for module in model.modules():
        act = getattr(module, "act", None)
        if type(module).__name__ == "ModernBertMLP" and isinstance(act, torch.nn.Module) \
                and not isinstance(act, ContiguousInput):
            module.act = ContiguousInput(act)
            wrapped += 1
    return wrapped


class _Positional(torch.nn.Module):
    """A Hugging Face model called with positional tensors, returning one tensor: what tracing takes."""

    def __init__(self, hf_model: torch.nn.Module, names: tuple[str, ...], output: str) -> None:
        super().__init__()
        self.hf_model, self.names, self.output = hf_model, names, output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.hf_model(**dict(zip(self.names, inputs)), return_dict=True)[self.output]


class TorchRunner:
    """Pads a batch of id sequences and runs it through a sentence-transformers model.

    With `trace` (CPU), the first module's Hugging Face model is traced to TorchScript and the
    modules after it (pooling, normalisation) run as they are. Why: an eager forward pass takes and
    drops the GIL around each of its ~400 ops, and a request thread holding the GIL makes every
    one of them wait (the convoy effect): two passes side by side beside one busy Python thread
    fell from 143-161 to 9 texts/s eager, 82-96 traced (README, Benchmark). A traced pass runs
    in C++ with the GIL released. The traced model is checked against the eager one on padded
    batches of several lengths; if tracing fails or differs, the model stays eager (logged).
    """

    def __init__(self, model: Any, device: str, dtype: torch.dtype, kind: str, trace: bool = False) -> None:
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
        self._script: Any = None
        self._script_inputs: tuple[str, ...] = ()
        self._script_output = ""
        self._tail: list[Any] = []  # the modules after the traced one (pooling, normalisation)
        if self.device.type == "cpu" and dtype != torch.float32:
            contiguous_activations(self.model)  # not float32: measured slower there in the server
        if self.trace_on(device, trace):
            self._trace()

    @staticmethod
    def trace_on(device: str, trace: bool) -> bool:
        """Tracing is for the CPU, where the GIL is the bottleneck; GPU passes stay eager (untested here)."""
        return trace and torch.device(device).type == "cpu"

    @property
    def traced(self) -> bool:
        return self._script is not None

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
            out = self._forward(features, self._script)
        if self.kind == "rerank":
            out = out.reshape(len(batch), -1)[:, 0]
        return out.float().cpu().numpy()

    def _forward(self, features: dict[str, torch.Tensor], script: Any) -> torch.Tensor:
        if script is None:
            return self.model(features)[self.output_key]
        features[self._script_output] = script(*(features[n] for n in self._script_inputs))
        for module in self._tail:
            features = module(features)
        return features[self.output_key]

    # -- tracing ---------------------------------------------------------------------------
    def _trace(self) -> None:
        """Trace the first module's model; keep it only if it matches the eager model."""
        first = self.model[0]
        try:
            text = first.modality_config["text"]
            hf_model, output = first.model, text["method_output_name"]
            if text["method"] != "forward" or not isinstance(output, str) or \
                    getattr(hf_model.config, "output_hidden_states", False):
                log.info("not tracing %s: its transformer is not a plain forward", type(hf_model).__name__)
                return
            accepted = inspect.signature(hf_model.forward).parameters
            names = tuple(n for n in _INPUT_NAMES if n in accepted and (n != "token_type_ids" or self.token_types))
            example = self._example_batch(2, 24, names)
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit's own deprecation notice
                script = torch.jit.trace(_Positional(hf_model, names, output).eval(), tuple(example.values()),
                                         check_trace=False)
            self._script_inputs, self._script_output = names, first.module_output_name
            self._tail = list(self.model)[1:]
            mismatch = self._check(script, names)
        except Exception as exc:  # any failure leaves the model eager, which is always correct
            log.warning("tracing %s failed, it runs eager (%s: %s)", type(self.model[0]).__name__,
                        type(exc).__name__, exc)
            return
        if mismatch:
            log.warning("traced model differs from the eager one (%s); it runs eager", mismatch)
            return
        self._script = script

    def _example_batch(self, rows: int, width: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Token ids (fixed seed) with the last row half padding, as `run` builds them."""
        vocab = int(getattr(self.model[0].model.config, "vocab_size", 0) or len(self.model.tokenizer))
        gen = torch.Generator().manual_seed(width * 31 + rows)
        ids = torch.randint(min(10, vocab - 1), vocab, (rows, width), generator=gen)
        mask = torch.ones_like(ids)
        if rows > 1:
            ids[-1, width // 2:], mask[-1, width // 2:] = self.pad_id, 0
        batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {n: batch[n].to(self.device) for n in names}

    def _check(self, script: Any, names: tuple[str, ...]) -> str:
        """'' if the traced and eager models agree on batches of several sizes, else how they differ.

        Lengths on both sides of ModernBERT's 128-token local window and one row, padding included;
        each runs twice, as TorchScript optimises a graph after its first runs.
        """
        for rows, width in ((1, 5), (3, 150), (2, 300)):
            width = min(width, self.max_seq_length)
            batch = self._example_batch(rows, width, names)
            with torch.inference_mode():
                want = self._forward(dict(batch), None).float()
                for _ in range(2):
                    got = self._forward(dict(batch), script).float()
                    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
                        diff = (got - want).abs().max().item() if got.shape == want.shape else "shape"
                        return f"batch {rows}x{width}: max difference {diff}"
        return ""
