"""Settings: the one place where configuration is read (environment + models TOML)."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

MODEL_KINDS = ("embedding", "rerank")
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "torch", "openvino")

DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    {"id": "cl-nagoya/ruri-v3-30m", "kind": "embedding"},
    {"id": "cl-nagoya/ruri-v3-310m", "kind": "embedding"},
    {"id": "cl-nagoya/ruri-v3-reranker-310m", "kind": "rerank"},
)


@dataclass(frozen=True)
class ModelSpec:
    """One configured model, as written in the models TOML (contract §2)."""

    id: str
    kind: str
    source: str
    revision: str | None = None
    prompts: str | dict[str, str] | None = None
    max_seq_length: int | None = None
    normalize: bool = True
    dtype: str = "auto"
    aliases: tuple[str, ...] = ()
    matryoshka_dimensions: tuple[int, ...] = ()
    instruction_template: str = "{instruction}"
    trust_remote_code: bool = False
    backend: str | None = None  # auto | torch | openvino; None: EMBEDAPI_BACKEND decides

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any], where: str) -> "ModelSpec":
        """Validate one TOML table; `where` names it in error messages."""
        known = {f.name for f in fields(cls)}
        unknown = set(entry) - known
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        if not isinstance(entry.get("id"), str) or not entry["id"]:
            raise ConfigError(f"{where}: 'id' (the model name clients send) is required")
        kind = entry.get("kind", "embedding")
        if kind not in MODEL_KINDS:
            raise ConfigError(f"{where}: kind must be one of {MODEL_KINDS}, not {kind!r}")
        dtype = entry.get("dtype", "auto")
        if dtype not in DTYPES:
            raise ConfigError(f"{where}: dtype must be one of {DTYPES}, not {dtype!r}")
        backend = entry.get("backend")
        if backend is not None and backend not in BACKENDS:
            raise ConfigError(f"{where}: backend must be one of {BACKENDS}, not {backend!r}")
        prompts = entry.get("prompts")
        if prompts is not None and not isinstance(prompts, (str, dict)):
            raise ConfigError(f"{where}: prompts must be a preset name or a table of input_type = prefix")
        template = entry.get("instruction_template", "{instruction}")
        if "{instruction}" not in template:
            raise ConfigError(f"{where}: instruction_template must contain '{{instruction}}'")
        max_len = entry.get("max_seq_length")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 4):
            raise ConfigError(f"{where}: max_seq_length must be an integer >= 4")
        return cls(
            id=entry["id"],
            kind=kind,
            source=str(entry.get("source") or entry["id"]),
            revision=entry.get("revision"),
            prompts=prompts,
            max_seq_length=max_len,
            normalize=bool(entry.get("normalize", True)),
            dtype=dtype,
            aliases=tuple(entry.get("aliases", ())),
            matryoshka_dimensions=tuple(int(d) for d in entry.get("matryoshka_dimensions", ())),
            instruction_template=template,
            trust_remote_code=bool(entry.get("trust_remote_code", False)),
            backend=backend,
        )


def load_model_specs(path: str | os.PathLike[str] | None) -> tuple[ModelSpec, ...]:
    """Read `[[models]]` tables from a TOML file, or return the built-in defaults."""
    if not path:
        return tuple(ModelSpec.from_mapping(m, f"default model {m['id']}") for m in DEFAULT_MODELS)
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"EMBEDAPI_MODELS_FILE {file} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"EMBEDAPI_MODELS_FILE {file} is not valid TOML: {exc}") from None
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: expected at least one [[models]] table")
    specs = tuple(ModelSpec.from_mapping(e, f"{file} [[models]] #{i + 1}") for i, e in enumerate(entries))
    names: set[str] = set()
    for spec in specs:
        for name in (spec.id, *spec.aliases):
            if name in names:
                raise ConfigError(f"{file}: model name {name!r} is used twice")
            names.add(name)
    return specs


def normalize_device(raw: str, name: str = "EMBEDAPI_DEVICE") -> str:
    """The one spelling of a device setting: auto, cpu, mps, cuda or cuda:N (case and spaces ignored)."""
    device = (raw or "").strip().lower() or "auto"
    if device in ("auto", "cpu", "mps", "cuda"):
        return device
    index = device.removeprefix("cuda:")
    if device.startswith("cuda:") and index.isdigit():
        return f"cuda:{int(index)}"
    raise ConfigError(f"{name} must be auto, cpu, cuda, cuda:N or mps, not {raw!r}")


def default_conversion_cache(env: Mapping[str, str]) -> str:
    """Beside the Hugging Face cache (HF_HOME, as huggingface_hub resolves it), so a volume keeps both."""
    hf_home = env.get("HF_HOME", "").strip() or os.path.join(
        env.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(hf_home), "embedapi", "openvino")


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, not {raw!r}") from None


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}") from None


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}")


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    keys = [k.strip() for k in env.get("EMBEDAPI_API_KEYS", "").split(",")]
    key_file = env.get("EMBEDAPI_API_KEYS_FILE", "").strip()
    if key_file:
        try:
            keys += [line.strip() for line in Path(key_file).read_text(encoding="utf-8").splitlines()]
        except OSError as exc:
            raise ConfigError(f"EMBEDAPI_API_KEYS_FILE {key_file} cannot be read: {exc.strerror}") from None
    return tuple(k for k in keys if k and not k.startswith("#"))


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told, with its defaults (docs/configuration.md lists each)."""

    models: tuple[ModelSpec, ...]
    models_file: str | None = None
    device: str = "auto"
    api_keys: tuple[str, ...] = ()
    port: int = 8000
    host: str = "0.0.0.0"
    load_models: str = "background"  # background | sync | off (gunicorn's post_fork loads)
    max_inputs: int = 2048
    max_documents: int = 1000
    max_text_chars: int = 200_000  # per input as fed: its prefix (or instruction) included
    max_instruction_chars: int = 4096  # the instruction is prepended to every input: bound the copies
    max_body_bytes: int = 32 * 1024 * 1024
    max_request_tokens: int = 300_000  # as OpenAI's embeddings API; counted on the ids fed (prefixes included)
    # Read deadlines of the Gunicorn worker (embedapi/gunicorn_worker.py; docs/security.md).
    header_timeout_s: float = 30.0  # request line + headers, from accept (or a kept-alive request's 1st byte)
    body_timeout_s: float = 30.0  # longest wait for more body bytes, and the rate rule's grace period
    body_min_rate: int = 32768  # bytes/s a body must average after the grace period (0: no rate rule)
    max_batch_tokens: int = 0  # 0 = the device's default (backend: 4096 on CPU, 16384 elsewhere)
    max_batch_size: int = 256
    batch_wait_ms: float = 2.0
    max_queue_tokens: int = 1_048_576
    batching: bool = True
    request_timeout_s: float = 600.0
    torch_threads: int = 0  # 0 = cores / workers
    parallel_batches: int = 0  # 0 = the device's default (backend: 2 on a CPU with 2+ threads, else 1)
    query_lanes: int = -1  # extra passes for non-bulk work while bulk holds the others; -1: CPU 1, else 0
    busy_wait_ms: float = 200.0  # while bulk work runs, other passes start at most this often (and batch)
    trace: bool = True  # CPU: models run traced to TorchScript, pooling included (GIL released), if they match eager
    prepack: bool = True  # CPU torch: linear weights reordered once for oneDNN at load, if the rows stay the same
    # auto | torch | openvino; a model entry's `backend` wins. torch until OpenVINO's worker memory stays bounded
    # under many batch shapes (tests/test_soak.py grew +300 MiB a minute on it; docs/backends.md)
    backend: str = "torch"
    conversion_cache: str = ""  # OpenVINO IR cache directory; "" = beside the Hugging Face cache; "off": none
    openvino_max_tokens: int = 512  # wider batches of an OpenVINO model run on torch (0: all on OpenVINO)
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def conversion_cache_root(self) -> str | None:
        """The conversion cache directory the loaders take, None when it is off."""
        return None if self.conversion_cache.strip().lower() == "off" else self.conversion_cache

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from environment variables; `overrides` (tests, create_app(config)) win."""
        env = os.environ if env is None else env
        models_file = overrides.pop("models_file", None) or env.get("EMBEDAPI_MODELS_FILE") or None
        load_models = env.get("EMBEDAPI_LOAD_MODELS", "background").strip().lower() or "background"
        if load_models not in ("background", "sync", "off"):
            raise ConfigError(f"EMBEDAPI_LOAD_MODELS must be background, sync or off, not {load_models!r}")
        log_format = env.get("EMBEDAPI_LOG_FORMAT", "text").strip().lower() or "text"
        if log_format not in ("text", "json"):
            raise ConfigError(f"EMBEDAPI_LOG_FORMAT must be text or json, not {log_format!r}")
        backend = env.get("EMBEDAPI_BACKEND", "torch").strip().lower() or "torch"
        if backend not in BACKENDS:
            raise ConfigError(f"EMBEDAPI_BACKEND must be one of {', '.join(BACKENDS)}, not {backend!r}")
        values: dict[str, Any] = dict(
            models=load_model_specs(models_file),
            models_file=models_file,
            device=normalize_device(env.get("EMBEDAPI_DEVICE", "auto")),
            api_keys=_api_keys(env),
            port=_env_int(env, "APP_PORT", 8000),
            host=env.get("EMBEDAPI_HOST", "0.0.0.0").strip() or "0.0.0.0",
            load_models=load_models,
            max_inputs=_env_int(env, "EMBEDAPI_MAX_INPUTS", 2048),
            max_documents=_env_int(env, "EMBEDAPI_MAX_DOCUMENTS", 1000),
            max_text_chars=_env_int(env, "EMBEDAPI_MAX_TEXT_CHARS", 200_000),
            max_instruction_chars=_env_int(env, "EMBEDAPI_MAX_INSTRUCTION_CHARS", 4096),
            header_timeout_s=_env_float(env, "EMBEDAPI_HEADER_TIMEOUT", 30.0),
            body_timeout_s=_env_float(env, "EMBEDAPI_BODY_TIMEOUT", 30.0),
            body_min_rate=_env_int(env, "EMBEDAPI_BODY_MIN_RATE", 32768),
            max_body_bytes=_env_int(env, "EMBEDAPI_MAX_BODY_BYTES", 32 * 1024 * 1024),
            max_request_tokens=_env_int(env, "EMBEDAPI_MAX_REQUEST_TOKENS", 300_000),
            max_batch_tokens=_env_int(env, "EMBEDAPI_MAX_BATCH_TOKENS", 0),
            max_batch_size=_env_int(env, "EMBEDAPI_MAX_BATCH_SIZE", 256),
            batch_wait_ms=_env_float(env, "EMBEDAPI_BATCH_WAIT_MS", 2.0),
            max_queue_tokens=_env_int(env, "EMBEDAPI_MAX_QUEUE_TOKENS", 1_048_576),
            batching=_env_bool(env, "EMBEDAPI_BATCHING", True),
            request_timeout_s=_env_float(env, "EMBEDAPI_REQUEST_TIMEOUT", 600.0),
            torch_threads=_env_int(env, "EMBEDAPI_TORCH_THREADS", 0),
            parallel_batches=_env_int(env, "EMBEDAPI_PARALLEL_BATCHES", 0),
            query_lanes=_env_int(env, "EMBEDAPI_QUERY_LANES", -1),
            busy_wait_ms=_env_float(env, "EMBEDAPI_BUSY_WAIT_MS", 200.0),
            trace=_env_bool(env, "EMBEDAPI_TRACE", True),
            prepack=_env_bool(env, "EMBEDAPI_PREPACK", True),
            backend=backend,
            openvino_max_tokens=_env_int(env, "EMBEDAPI_OPENVINO_MAX_TOKENS", 512),
            conversion_cache=env.get("EMBEDAPI_CONVERSION_CACHE", "").strip() or default_conversion_cache(env),
            log_format=log_format,
            log_level=env.get("EMBEDAPI_LOG_LEVEL", "INFO").strip().upper() or "INFO",
        )
        values.update(overrides)
        values["device"] = normalize_device(values["device"])
        if isinstance(values.get("api_keys"), str):
            values["api_keys"] = tuple(k.strip() for k in values["api_keys"].split(",") if k.strip())
        return cls(**values)
