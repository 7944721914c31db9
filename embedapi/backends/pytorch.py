"""The torch side: device and dtype choice, loading, warm-up and guarded forward passes on token ids.

Only the modules of this package import torch and sentence-transformers (openvino_runner.py: OpenVINO).
The forward pass feeds the ids the service already made to the model's own modules (nothing is tokenized twice; the result is what
`SentenceTransformer.encode` / `CrossEncoder.predict` compute). `GuardedRunner` contains GPU faults:
out-of-memory batches are split, non-finite rows fail their batch, a broken CUDA context is reported.
Measurements behind the tuning here: docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import inspect
import logging
import os
import shutil
import threading
import warnings
from typing import Any, Callable, Mapping, MutableMapping, Sequence

# libgomp's idle threads spin after every parallel region and starve the request threads sharing the cores
# (several times slower under load; docs/benchmarks.md). It reads this once, when torch loads: set before the
# import; the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 512 << 20


def tune_malloc(env: Mapping[str, str] = os.environ) -> bool:
    """Keep a forward pass's freed activations mapped (blocks under 64 MiB, 512 MiB of heap top), so each
    batch does not fault its pages in again (docs/benchmarks.md). MALLOC_* / GLIBC_TUNABLES in the
    environment win; not glibc: no-op.
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

from ..config import ModelSpec, normalize_device
from ..errors import ConfigError, OutOfMemory

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gpu_expected(env: Mapping[str, str] = os.environ) -> bool:
    """Whether this process was meant to have a GPU: one is visible to it, or nvidia-smi is installed."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return any(d.strip() and d.strip() != "-1" for d in visible.split(","))
    return shutil.which("nvidia-smi") is not None


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (install the CUDA wheel: requirements-gpu.txt)"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but cannot use it here "
            "(no device visible, or an NVIDIA driver older than that CUDA needs; see docs/gpu.md)")


def pick_device(requested: str) -> str:
    """Resolve a normalised EMBEDAPI_DEVICE (config.normalize_device) to the torch device to load on.

    `auto` is cuda:0 (in a Gunicorn worker, the one GPU CUDA_VISIBLE_DEVICES leaves it), then mps, then
    cpu; when a GPU was expected but torch cannot use CUDA it falls back to CPU with a warning that says
    why. An explicit cuda device that torch cannot use is a ConfigError.
    """
    requested = normalize_device(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if _gpu_expected():
            log.warning("EMBEDAPI_DEVICE=auto: a GPU is present but %s; FALLING BACK TO CPU (slow). "
                        "Set EMBEDAPI_DEVICE=cpu to silence this, or fix the install", _why_no_cuda())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"EMBEDAPI_DEVICE={requested}, but {_why_no_cuda()}")
        return requested if ":" in requested else "cuda:0"
    return requested


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read(200_000)
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cuda_capability(device: str) -> tuple[int, int]:
    """Compute capability of `device` itself (not the current device), without allocating on any GPU."""
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return int(major), int(minor)


def pick_dtype(requested: str, device: str, kind: str = "embedding") -> torch.dtype:
    """`auto`: bfloat16 on GPUs of compute capability 8.0+ (and ROCm), float16 on older ones (where
    bfloat16 is only emulated); on CPUs, bfloat16 for embedding models where the CPU computes it natively,
    else float32. CPU rerankers stay float32: bfloat16 moved their scores past 2e-3 and reordered the top
    documents on both backends (docs/backends.md)."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.startswith("cuda"):
        if torch.version.hip:
            return torch.bfloat16
        return torch.bfloat16 if cuda_capability(device) >= (8, 0) else torch.float16
    if device == "cpu" and kind == "embedding" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def pick_attention(device: str, dtype: torch.dtype) -> str:
    """FlashAttention 2 where it runs (CUDA, capability 8.0+, half precision, `flash_attn` installed: it
    skips the padding), else PyTorch's scaled-dot-product attention (sentence-transformers' default)."""
    if device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16) and not torch.version.hip \
            and cuda_capability(device) >= (8, 0) and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def runtime_summary(device: str) -> str:
    """One log line: torch and the CUDA it brings, and the device this worker loads on."""
    text = f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        text += (f", cuDNN {cudnn or 'none'}; {device} is {props.name} (compute capability "
                 f"{props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB), "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, "
                 f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}")
    return text


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
    """Forward passes side by side: two on a CPU with two threads or more (each on half of them under load;
    docs/benchmarks.md), one on a GPU or a single-thread CPU worker."""
    return 2 if device == "cpu" and threads >= 2 else 1


def load(spec: ModelSpec, device: str, dtype: torch.dtype = torch.float32, attention: str = "sdpa") -> Any:
    """Load a configured model with sentence-transformers (hub id, offline cache or local directory), its
    weights read directly in `dtype` (no float32 copy first) with the `attention` implementation; if that
    implementation cannot load, with sdpa (logged)."""
    kwargs: dict[str, Any] = dict(device=device, trust_remote_code=spec.trust_remote_code)
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.kind == "embedding":
        from sentence_transformers import SentenceTransformer as cls
    else:
        from sentence_transformers import CrossEncoder as cls
    try:
        model = cls(spec.source, model_kwargs={"dtype": dtype, "attn_implementation": attention}, **kwargs)
    except (ImportError, ValueError) as exc:
        if attention == "sdpa":
            raise
        log.warning("%s: attention %s failed to load (%s); using sdpa", spec.id, attention, exc)
        model = cls(spec.source, model_kwargs={"dtype": dtype, "attn_implementation": "sdpa"}, **kwargs)
    if spec.max_seq_length:
        model.max_seq_length = spec.max_seq_length
    model.eval()
    return model


def attention_of(model: Any) -> str:
    """The attention implementation the model's transformer really uses (as transformers resolved it)."""
    hf_model = getattr(model[0], "auto_model", None) or getattr(model[0], "model", None)
    return str(getattr(getattr(hf_model, "config", None), "_attn_implementation", None) or "unknown")


def _dtype_of(model: Any) -> torch.dtype | None:
    first = next(iter(model.parameters()), None)
    return first.dtype if first is not None else None


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

    ModernBERT's MLP applies GELU to a strided half of one projection, which CPU torch runs slower than on
    a copy; CPU runners use this in bfloat16 only, where it measured faster (docs/benchmarks.md).
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


# oneDNN's linear on a weight reordered once into its blocked layout, as TorchScript (a traced pass stays one
# C++ call): `F.linear` reorders the weight on every call. Its `scalars` argument is typed `Scalar?[]`, which
# torch.jit.trace cannot record from Python, hence the compiled source.
_PACKED_SOURCE = """
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    scalars: List[Optional[Union[int, float, complex]]] = []
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", scalars, "")
"""
_packed_unit: Any = None


def _packed_linear() -> Any:
    global _packed_unit
    if _packed_unit is None:
        _packed_unit = torch.jit.CompilationUnit(_PACKED_SOURCE)
    return _packed_unit.packed_linear


class PackedLinear(torch.nn.Module):
    """`nn.Linear` with its weight reordered once at load for oneDNN (`mkldnn._reorder_linear_weight`), so a
    pass no longer reorders it on every call: the same rows (bit for bit in bfloat16 on the machines measured),
    faster most at small batches (docs/benchmarks.md)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self._linear = _packed_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.weight, self.bias)


# A prepacked linear is a oneDNN primitive per input shape, kept in two caches of torch's oneDNN: ideep's, one per
# calling thread (LRU_CACHE_CAPACITY, 1024 by default), and oneDNN's own (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024).
# At those defaults a worker meeting many batch shapes grew without end: tests/test_soak.py +419-497 MiB in 60 s
# (unpacked +27-32); with both at 128 +86-106, at 32 +9-49 with the soak's throughput unchanged (docs/benchmarks.md).
# Both are read once, at torch's first primitive; a value in the environment wins.
ONEDNN_CACHE_ENTRIES = 32
ONEDNN_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # oneDNN's, old name 2nd
IDEEP_CACHE_VARS = ("LRU_CACHE_CAPACITY",)


def default_env(names: Sequence[str], value: int, env: MutableMapping[str, str]) -> bool:
    """Set names[0] to `value` unless the environment sets one of `names` (a user's value wins); whether set."""
    if any(n in env for n in names):
        return False
    env[names[0]] = str(value)
    return True


def bound_onednn_caches(env: MutableMapping[str, str] = os.environ) -> list[str]:
    """Set each of torch's oneDNN cache capacities the environment leaves unset to ONEDNN_CACHE_ENTRIES; return
    the variables set. They are the process's: they bind only if torch has not made a primitive yet (a worker
    loads its models first), and OpenVINO's plugin reads the oneDNN one too (openvino_runner.bound_onednn_cache)."""
    return [names[0] for names in (IDEEP_CACHE_VARS, ONEDNN_CACHE_VARS)
            if default_env(names, ONEDNN_CACHE_ENTRIES, env)]


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; elsewhere a no-op): what a load freed
    (an export, the weights a prepack replaced) that tune_malloc's high trim threshold would otherwise keep."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# A float32 model computes on the model file's pages (safetensors' mapping: shared by the workers, and the page
# cache's to drop); its packed copy would be each worker's own memory. So float32 packs only small models: the 30m
# shape's linears are 42 MB (+45 MB anonymous per worker measured), the 310m shape's ~940 MB. A bfloat16 model's
# weights are converted at load, each worker's own already: the packed copy replaces them (freed, then trimmed).
PREPACK_FLOAT32_MAX_BYTES = 128 << 20


def prepack_available(dtype: torch.dtype) -> bool:
    """oneDNN's linear can serve `dtype` here: an x86-64 CPU build with mkldnn (measured there only)."""
    import platform
    return dtype in (torch.float32, torch.bfloat16) and platform.machine().lower() in ("x86_64", "amd64") \
        and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack_linears(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """Replace every `nn.Linear` under `module` by a PackedLinear; return (parent, name, original) of each, for
    `unpack_linears`."""
    swapped = []
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:  # not subclasses (quantized, LoRA, ...): their forward differs
                setattr(parent, name, PackedLinear(child))
                swapped.append((parent, name, child))
    return swapped


def unpack_linears(swapped: list[tuple[torch.nn.Module, str, torch.nn.Linear]]) -> None:
    for parent, name, original in swapped:
        setattr(parent, name, original)


class _Positional(torch.nn.Module):
    """A Hugging Face model called with positional tensors, returning one tensor: what tracing takes."""

    def __init__(self, hf_model: torch.nn.Module, names: tuple[str, ...], output: str) -> None:
        super().__init__()
        self.hf_model, self.names, self.output = hf_model, names, output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.hf_model(**dict(zip(self.names, inputs)), return_dict=True)[self.output]


class _Tail(torch.nn.Module):
    """The sentence-transformers modules after a transformer (pooling, normalisation), from its hidden states to
    float32 rows. Traced on its own for a transformer that runs elsewhere (OpenVINO), and inside `_Whole`."""

    def __init__(self, tail: list[torch.nn.Module], module_output: str, output_key: str) -> None:
        super().__init__()
        self.tail, self.module_output, self.output_key = torch.nn.ModuleList(tail), module_output, output_key

    def apply_to(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        for module in self.tail:
            features = module(features)
        return features[self.output_key].float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.apply_to({"input_ids": input_ids, "attention_mask": attention_mask, self.module_output: hidden})


class _Whole(torch.nn.Module):
    """The transformer and the modules after it, as `run` calls them eager, ending in float32 rows: traced as one
    graph, a pass is one call that releases the GIL once.

    Every torch op called from Python releases the GIL and takes it back; under load each take waits for the
    request threads, so a pooling of ten ops in Python costs a lane ten waits (docs/benchmarks.md).
    """

    def __init__(self, positional: _Positional, after: _Tail) -> None:
        super().__init__()
        self.positional, self.after = positional, after

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        features = dict(zip(self.positional.names, inputs))
        features[self.after.module_output] = self.positional(*inputs)
        return self.after.apply_to(features)


def traced_tail(tail: list[torch.nn.Module], module_output: str, output_key: str, width: int) -> Any:
    """`_Tail` traced, if it gives the eager modules' rows on padded batches of several shapes; else None
    (logged), and the modules run eager. `width`: the hidden states' last dimension."""
    eager = _Tail(tail, module_output, output_key).eval()

    def example(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(rows * 131 + length)
        ids = torch.randint(10, 1000, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        if rows > 1:
            ids[-1, length // 2:], mask[-1, length // 2:] = 0, 0
        return ids, mask, torch.randn(rows, length, width, generator=gen)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            script = torch.jit.trace(eager, example(2, 24), check_trace=False)
            for shape in ((1, 5), (3, 150), (2, 24), (2, 300)):
                inputs = example(*shape)
                want, got = eager(*inputs), script(*inputs)
                if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=1e-6):
                    raise ValueError(f"the traced modules differ from the eager ones on a batch of {shape}")
    except Exception as exc:  # eager is always correct
        log.warning("the modules after the transformer run eager (%s: %s)", type(exc).__name__, exc)
        return None
    return script


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int, token_types: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(input_ids, attention_mask, token_type_ids or None) of a batch padded on the right, as the tokenizer
    pads; a pair's second segment (after `first_len` ids) gets token type 1."""
    width = max(len(s) for s in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    types = np.zeros((len(batch), width), dtype=np.int64) if token_types else None
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        first = getattr(seq, "first_len", None)
        if types is not None and first is not None:
            types[row, first: len(seq)] = 1
    return ids, mask, types


def example_ids(rows: int, width: int, vocab: int, pad_id: int) -> list[list[int]]:
    """Token id sequences (fixed seed) of `width` ids, the last of several rows half as long (so padded)."""
    gen = np.random.default_rng(width * 31 + rows)
    out = [[int(i) for i in gen.integers(min(10, vocab - 1), vocab, width)] for _ in range(rows)]
    if rows > 1:
        out[-1] = out[-1][: max(1, width // 2)]
    return out


def input_names(hf_model: torch.nn.Module, token_types: bool) -> tuple[str, ...]:
    """The inputs a transformer's forward takes among those `run` builds (token types only if the tokenizer
    makes them)."""
    accepted = inspect.signature(hf_model.forward).parameters
    return tuple(n for n in _INPUT_NAMES if n in accepted and (n != "token_type_ids" or token_types))


def _autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


class TorchRunner:
    """Pads a batch of id sequences and runs it through a sentence-transformers model.

    With `trace` (CPU), the first module's Hugging Face model is traced to TorchScript (the pooling after it
    runs as is), so a pass runs in C++ without taking the GIL around each op, which request threads would
    otherwise hold up (docs/benchmarks.md). The traced model is checked against the eager one; if tracing
    fails or differs, the model stays eager (logged).
    """

    backend = "torch"
    cache: str | None = None  # no conversion cache (the OpenVINO runner's "hit" / "built" / "rebuilt")

    def __init__(self, model: Any, device: str, dtype: torch.dtype, kind: str, trace: bool = False,
                 autocast: torch.dtype | None = None, prepack: bool = False) -> None:
        # Loaded in `dtype` already (load()); cast only what is not, so float32 buffers (rotary) stay as
        # sentence-transformers keeps them with model_kwargs={"dtype": ...}.
        self.model = model if _dtype_of(model) == dtype else model.to(dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        # With `autocast` (bfloat16, on a float32 model), passes run under torch.autocast: matmuls in bfloat16 on
        # weights cast as each is used (no cast cache, so no second copy of the weights stays), the rest in
        # float32. The OpenVINO runner's long batches run so, on the float32 model the conversion loaded: its
        # weights stay on the model file's mapping (docs/backends.md).
        self.autocast = autocast
        self.kind = kind
        self.output_key = "sentence_embedding" if kind == "embedding" else "scores"
        tokenizer = model.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.token_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.max_seq_length = _max_length(model)
        # The token budget when EMBEDAPI_MAX_BATCH_TOKENS is not set: CPU batches past a few thousand padded
        # tokens only grow the activations out of cache (docs/benchmarks.md); GPUs want big batches.
        self.default_batch_tokens = CPU_BATCH_TOKENS if self.device.type == "cpu" else GPU_BATCH_TOKENS
        self._script: Any = None
        self._script_inputs: tuple[str, ...] = ()
        self._script_output = ""
        self._tail: list[Any] = []  # the modules after the traced one (pooling, normalisation)
        self._whole = False  # the trace is the whole model: it returns the rows
        if self.device.type == "cpu" and dtype != torch.float32:
            contiguous_activations(self.model)  # not float32: measured slower there in the server
        # With `prepack` (CPU, no autocast: a packed weight is not cast), the transformer's linear weights are
        # reordered once for oneDNN, kept only if the rows stay those of the model as loaded. Off for the OpenVINO
        # converter's reference runner: the exporter must see plain modules.
        self.prepacked = 0
        if prepack and self.device.type == "cpu" and autocast is None and prepack_available(dtype):
            self.prepacked = self._prepack()
        if self.trace_on(device, trace) and autocast is None:
            self._trace()

    @staticmethod
    def trace_on(device: str, trace: bool) -> bool:
        """Tracing is for the CPU, where the GIL is the bottleneck; GPU passes stay eager (untested here)."""
        return trace and torch.device(device).type == "cpu"

    @property
    def traced(self) -> bool:
        return self._script is not None

    @property
    def traced_whole(self) -> bool:
        """The trace is the whole model, pooling included: one call a pass."""
        return self._script is not None and self._whole

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask, types = pad_batch(batch, self.pad_id, self.token_types)
        on_cpu = self.device.type == "cpu"  # no .to() there: each torch call from Python is a GIL hand-off
        features = {"input_ids": torch.from_numpy(ids) if on_cpu else torch.from_numpy(ids).to(self.device),
                    "attention_mask": torch.from_numpy(mask) if on_cpu else torch.from_numpy(mask).to(self.device)}
        if types is not None:
            features["token_type_ids"] = torch.from_numpy(types).to(self.device)
        with torch.inference_mode(), _autocast(self.device.type, self.autocast):
            out = self._forward(features, self._script)
            rows = out.numpy() if on_cpu and out.dtype == torch.float32 else out.float().cpu().numpy()
        if self.kind == "rerank":
            rows = rows.reshape(len(batch), -1)[:, 0]
        return rows

    def _forward(self, features: dict[str, torch.Tensor], script: Any) -> torch.Tensor:
        if script is None:
            return self.model(features)[self.output_key]
        out = script(*(features[n] for n in self._script_inputs))
        if self._whole:
            return out
        features[self._script_output] = out
        for module in self._tail:
            features = module(features)
        return features[self.output_key]

    def _prepack(self) -> int:
        """Swap the first module's linears for PackedLinear; keep them if the model's rows on batches around and
        past the local window stay within float32's tolerance of the plain model (bfloat16: the trace's check),
        else put the originals back (logged). Returns how many were swapped."""
        hf_model = getattr(self.model[0], "model", None)
        if not isinstance(hf_model, torch.nn.Module):
            return 0
        if self.dtype == torch.float32:
            size = sum(m.weight.numel() * m.weight.element_size() for m in hf_model.modules()
                       if type(m) is torch.nn.Linear)
            if size > PREPACK_FLOAT32_MAX_BYTES:
                log.info("linear weights not prepacked: in float32 they stay the model file's shared pages "
                         "(%d MiB; a packed copy would be each worker's own memory above %d MiB)",
                         size >> 20, PREPACK_FLOAT32_MAX_BYTES >> 20)
                return 0
        bound_onednn_caches()  # before the first packed primitive
        names = input_names(hf_model, self.token_types)
        batches = [self._example_batch(rows, min(width, self.max_seq_length), names)
                   for rows, width in ((1, 5), (3, 150))]
        swapped: list[tuple[torch.nn.Module, str, torch.nn.Linear]] = []
        atol, rtol = (1e-5, 1e-4) if self.dtype == torch.float32 else (1e-4, 1e-3)
        try:
            with torch.inference_mode():
                want = [self._forward(dict(b), None).float() for b in batches]
                swapped = prepack_linears(hf_model)
                for batch, expected in zip(batches, want):
                    got = self._forward(dict(batch), None).float()
                    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=rtol, atol=atol):
                        diff = (got - expected).abs().max().item() if got.shape == expected.shape else "shape"
                        raise ValueError(f"rows differ from the plain model's by {diff}")
        except Exception as exc:  # the plain model is always correct
            unpack_linears(swapped)
            log.warning("linear weights not prepacked (%s: %s)", type(exc).__name__, exc)
            return 0
        count = len(swapped)
        del swapped, want  # the replaced weights: freed here, given back by the trim
        trim_heap()
        return count

    # -- tracing ---------------------------------------------------------------------------
    def _trace(self) -> None:
        """Trace the whole model (transformer, pooling, normalisation) or, failing that, the first module's
        transformer alone; keep a trace only if it matches the eager model."""
        first = self.model[0]
        text = getattr(first, "modality_config", {}).get("text", {})
        hf_model, output = getattr(first, "model", None), text.get("method_output_name")
        if hf_model is None or text.get("method") != "forward" or not isinstance(output, str) or \
                getattr(hf_model.config, "output_hidden_states", False):
            log.info("not tracing %s: its transformer is not a plain forward", type(hf_model).__name__)
            return
        names = input_names(hf_model, self.token_types)
        tail = list(self.model)[1:]
        problem = ""
        for whole in (True, False):
            positional = _Positional(hf_model, names, output)
            module = _Whole(positional, _Tail(tail, first.module_output_name, self.output_key)) if whole \
                else positional
            try:
                with torch.inference_mode(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings, and torch.jit's own deprecation notice
                    script = torch.jit.trace(module.eval(), tuple(self._example_batch(2, 24, names).values()),
                                             check_trace=False)
                self._script_inputs, self._script_output = names, first.module_output_name
                self._tail = [] if whole else tail
                self._whole = whole
                mismatch = self._check(script, names)
            except Exception as exc:  # any failure leaves the model eager, which is always correct
                problem = f"tracing {type(first).__name__} failed ({type(exc).__name__}: {exc})"
                continue
            if not mismatch:
                self._script = script
                if problem:
                    log.info("the whole model is not traced (%s); its transformer alone is traced", problem)
                return
            problem = f"traced model differs from the eager one ({mismatch})"
        self._tail, self._whole = [], False
        log.warning("%s; it runs eager", problem)

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


# -- faults ------------------------------------------------------------------------------------
_FATAL_MARKS = ("CUDA error", "CUBLAS_STATUS_EXECUTION_FAILED", "CUBLAS_STATUS_INTERNAL_ERROR", "CUDNN_STATUS_",
                "device-side assert", "illegal memory access", "unspecified launch failure")


def is_oom(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) allocation failure: recoverable by freeing memory and doing less."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in str(exc) or "out of memory" in str(exc)))


def is_fatal(exc: BaseException) -> bool:
    """A CUDA error other than out-of-memory: the process's CUDA context is unusable from now on."""
    if is_oom(exc):
        return False
    return isinstance(exc, torch.AcceleratorError) or (
        isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _FATAL_MARKS))


def release_memory() -> None:
    """Return the failed pass's cached blocks to the GPU (after its tensors are unreferenced)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class NonFiniteOutput(RuntimeError):
    """A forward pass produced NaN or infinite values; its batch fails instead of sending `null` rows."""


class BatchOutOfMemory(OutOfMemory):
    """Some items of a batch did not fit even alone; `rows` holds every row that was computed (the failed
    ones NaN) and `failed` their indices, so an engine can fail just those requests."""

    def __init__(self, message: str, rows: np.ndarray, failed: list[int]) -> None:
        super().__init__(message, headers={"Retry-After": "5"})
        self.rows, self.failed = rows, failed


class GuardedRunner:
    """Wraps a runner (the engine's `run(batch) -> rows`) so GPU faults stay contained.

    - Out of memory: the cache is released and the batch is split in halves, recursively, so the rest of
      the batch is computed and only an item that cannot fit alone fails (BatchOutOfMemory, a 503 naming
      EMBEDAPI_MAX_BATCH_TOKENS).
    - A non-OOM CUDA error (a broken context) calls `on_fatal(exc)` (the registry makes the worker exit so
      Gunicorn replaces it) and is re-raised.
    - Rows that are not finite raise NonFiniteOutput: the batch fails (500) rather than answer `null`.
    """

    def __init__(self, inner: Any, on_fatal: Callable[[BaseException], None] | None = None,
                 release: Callable[[], None] = release_memory, budget: int | None = None) -> None:
        self.inner = inner
        self.on_fatal = on_fatal
        self.release = release
        self.budget = budget  # EMBEDAPI_MAX_BATCH_TOKENS in effect, for the messages
        self.splits = 0  # batches split after an out-of-memory error (for logs and tests)

    def __getattr__(self, name: str) -> Any:  # max_seq_length, traced, model, ... of the wrapped runner
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def run(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        pieces: list[tuple[int, np.ndarray | None]] = []  # (offset, rows); None: an item that failed alone
        self._run(list(batch), 0, pieces)
        done = [r for _, r in pieces if r is not None]
        if len(pieces) == 1 and done:
            rows = done[0]
        else:
            rows = np.full((len(batch), *(done[0].shape[1:] if done else ())), np.nan, dtype=np.float32)
            for offset, part in pieces:
                if part is not None:
                    rows[offset: offset + len(part)] = part
        failed = [offset for offset, part in pieces if part is None]
        if failed:
            longest = max(len(batch[i]) for i in failed)
            raise BatchOutOfMemory(
                f"An input of {longest} tokens does not fit in this worker's GPU memory even alone; retry later "
                "or send shorter inputs. Operators: lower EMBEDAPI_MAX_BATCH_TOKENS "
                f"(now {self.budget or 'the default'}) or the model's max_seq_length, or give the worker a GPU "
                "of its own", rows, failed)
        finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
        if not finite.all():
            bad = [i for i, ok in enumerate(finite) if not ok]
            raise NonFiniteOutput(f"{len(bad)} of {len(batch)} output rows are not finite (rows {bad[:8]}, "
                                  f"lengths {[len(batch[i]) for i in bad[:8]]}); float16 overflows on some inputs: "
                                  "set dtype = \"bfloat16\" or \"float32\" for this model")
        return rows

    def _run(self, batch: list[Sequence[int]], offset: int, pieces: list[tuple[int, np.ndarray | None]]) -> None:
        oom = None
        try:
            pieces.append((offset, self.inner.run(batch)))
            return
        except Exception as exc:  # classified below; anything else propagates unchanged
            if not is_oom(exc):
                if is_fatal(exc) and self.on_fatal is not None:
                    self.on_fatal(exc)
                raise
            oom = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        # Outside the except block, so the failed pass's frames (and their tensors) are gone.
        self.release()
        width = max(len(s) for s in batch)
        if len(batch) == 1:
            log.error("out of memory on one input of %d tokens alone (%s)", width, oom)
            pieces.append((offset, None))
            return
        self.splits += 1
        log.warning("out of memory on a batch of %d x %d tokens (%s); cache released, retrying it as two halves",
                    len(batch), width, oom)
        mid = len(batch) // 2
        self._run(batch[:mid], offset, pieces)
        self._run(batch[mid:], offset + mid, pieces)


# -- warm-up -------------------------------------------------------------------------------------
def warm_shapes(budget: int, max_batch_size: int, max_seq_length: int) -> list[tuple[int, int]]:
    """(rows, width) of the most demanding batches the engine can form under the token budget: the longest
    input alone, the widest batch at the budget, and the most rows at the budget; largest first."""
    budget, max_batch_size = max(1, budget), max(1, max_batch_size)
    longest = (1, max_seq_length)
    width = min(max_seq_length, budget)
    at_budget = (max(1, min(max_batch_size, budget // width)), width)
    short = max(1, min(max_seq_length, budget // max_batch_size))
    many = (max(1, min(max_batch_size, budget // short)), short)
    shapes = {longest, at_budget, many}
    kept = [s for s in shapes if not any(o != s and o[0] >= s[0] and o[1] >= s[1] for o in shapes)]
    return sorted(kept, key=lambda s: (-(s[0] * s[1]), -s[1]))


def warms_worst_shapes(device: str) -> bool:
    """Worst-shape warm-up runs on accelerators, whose memory is small and whose OOM is recoverable;
    a CPU's memory is the host's (and its passes are slow), so CPU workers warm up on one short text."""
    return torch.device(device).type != "cpu"


def warm_up(runner: Any, sample: Sequence[int], shapes: Sequence[tuple[int, int]], model_id: str,
            budget: int) -> None:
    """Run `runner` once per (rows, width) on ids tiled from `sample`; ConfigError naming the settings to
    lower when one does not fit. Logs the peak GPU memory it took."""
    device = getattr(runner, "device", None)
    cuda = isinstance(device, torch.device) and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for rows, width in shapes:
        seq = [int(sample[i % len(sample)]) for i in range(width)]
        failure = None
        try:
            runner.run([seq] * rows)
        except Exception as exc:
            if not is_oom(exc):
                raise
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if failure is not None:
            release_memory()
            free = ""
            if cuda:
                free_b, total_b = torch.cuda.mem_get_info(device)
                free = f" ({free_b / 2**20:.0f} of {total_b / 2**20:.0f} MiB free after the failure)"
            raise ConfigError(
                f"{model_id}: warm-up batch of {rows} x {width} tokens does not fit in memory{free}: {failure}. "
                f"Lower EMBEDAPI_MAX_BATCH_TOKENS (now {budget}), EMBEDAPI_MAX_BATCH_SIZE or the model's "
                "max_seq_length, load fewer models per GPU, or use a larger GPU")
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        log.info("%s: warm-up at %s (rows x tokens) fits; peak %.0f MiB allocated of %.0f MiB",
                 model_id, ", ".join(f"{r}x{w}" for r, w in shapes), peak / 2**20, total / 2**20)
