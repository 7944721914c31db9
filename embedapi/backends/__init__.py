"""Forward-pass backends: what runs a model's transformer, behind the runner interface the engine uses.

A runner has `run(batch of token-id sequences) -> np.ndarray` (one float32 row per sequence: an embedding
or a reranker's logit) and `max_seq_length`, `default_batch_tokens`, `device`, `dtype`, `pad_id`,
`backend` ("torch" / "openvino"), `cache` and `traced`. `pytorch` is the torch runner (every device, and the
fallback); `openvino_runner` runs the transformer in OpenVINO on CPUs. `load_runner` picks one for a model:
`auto` is OpenVINO on CPU when it is installed and passes the parity check at load, torch otherwise and on
every GPU or mps. Only this package imports torch and OpenVINO (docs/backends.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..config import ModelSpec
from ..errors import ConfigError
from . import pytorch

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A model's runner and what describes it (the sentence-transformers model keeps tokenizer and modules)."""

    runner: Any
    model: Any
    dtype: Any
    attention: str
    backend: str  # "torch" | "openvino"
    note: str = ""  # why torch serves where OpenVINO was asked for ("" otherwise)


def choose(requested: str, device: str, dtype_name: str, model_id: str) -> str:
    """The backend to try first for a model: "openvino" or "torch". ConfigError for an explicit `openvino`
    that cannot run here (not a CPU device, or a dtype OpenVINO does not serve)."""
    if requested == "torch":
        return "torch"
    cpu = device == "cpu"
    if requested == "openvino":
        if not cpu:
            raise ConfigError(f"{model_id}: backend = \"openvino\" runs on the CPU only, but this worker's device is "
                              f"{device}: set EMBEDAPI_DEVICE=cpu, or backend = \"auto\" / \"torch\" for this model")
        if dtype_name not in ("float32", "bfloat16"):
            raise ConfigError(f"{model_id}: backend = \"openvino\" serves dtype float32 or bfloat16, not "
                              f"{dtype_name}: change the model's dtype, or use backend = \"torch\"")
        return "openvino"
    return "openvino" if cpu and dtype_name in ("float32", "bfloat16") else "torch"


def load_runner(spec: ModelSpec, device: str, requested: str, *, trace: bool, threads: int, streams: int,
                cache_root: str | None, openvino_max_tokens: int = 0, prepack: bool = False) -> Loaded:
    """Load `spec` and build its runner on the backend `choose` picks. `auto` falls back to torch (the reason
    logged) when OpenVINO is missing or its conversion fails the parity check; an explicit `openvino` raises
    ConfigError instead, as serving other vectors than asked for would be a silent surprise.

    With `openvino_max_tokens` > 0, batches wider than that run on an eager torch runner of the float32 model the
    conversion loaded (its weights stay on the model file's mapping, so no second copy is held), under bfloat16
    autocast when the serving dtype is bfloat16; with 0 every batch runs on OpenVINO and the torch transformer is
    freed. With `prepack`, a CPU torch runner's linear weights are reordered once for oneDNN
    (pytorch.prepack_linears)."""
    dtype = pytorch.pick_dtype(spec.dtype, device, spec.kind)  # from this device's own capability
    name = pytorch.dtype_name(dtype)
    picked = choose(requested, device, name, spec.id)
    note = ""
    if picked == "openvino":
        from . import openvino_runner

        missing = openvino_runner.available()
        if missing:
            note = f"OpenVINO is not importable ({missing})"
        else:
            model = pytorch.load(spec, device, pytorch.torch.float32, "sdpa")  # converted and checked in float32
            attention = pytorch.attention_of(model)
            keep = openvino_max_tokens > 0  # torch serves the long batches from the same float32 model
            try:
                runner = openvino_runner.convert(model, spec, dtype, threads, streams, cache_root, free_torch=not keep)
            except openvino_runner.NotConverted as exc:
                note = str(exc)
            except Exception as exc:  # an exporter or runtime failure: torch is always correct
                note = f"conversion failed ({type(exc).__name__}: {exc})"
            else:
                if keep:
                    # Eager: tracing cost ~2.4 s of start-up on the 30m shape and ran batches of 300+ tokens no
                    # faster. A bfloat16 model of its own cost a second copy of the weights (~0.6 GB on the 310m
                    # shape); autocast on the float32 one took 2-23 % longer a row and is nearer float32
                    # (bench/backends.py --long, docs/backends.md).
                    auto = None if dtype == pytorch.torch.float32 else dtype
                    runner.long = pytorch.TorchRunner(model, device, pytorch.torch.float32, spec.kind, trace=False,
                                                      autocast=auto)
                    runner.max_tokens = openvino_max_tokens
                return Loaded(runner, model, dtype, attention, "openvino")
            del model
        if requested == "openvino":
            raise ConfigError(f"{spec.id}: backend = \"openvino\" cannot serve it: {note}; "
                              "use backend = \"auto\" or \"torch\"")
        log.warning("%s: serving on torch, not OpenVINO: %s", spec.id, note)
    model = pytorch.load(spec, device, dtype, pytorch.pick_attention(device, dtype))
    runner = pytorch.TorchRunner(model, device, dtype, spec.kind, trace=trace, prepack=prepack)
    return Loaded(runner, model, dtype, pytorch.attention_of(model), "torch", note)
