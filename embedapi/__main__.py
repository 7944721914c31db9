"""Command line: `python -m embedapi config` and `python -m embedapi download [ids...]`.

Neither command imports torch: `download` only fills the Hugging Face cache (so it runs in an image
build with no GPU), `config` only reads the environment and the models TOML. `download --convert` also builds
the OpenVINO conversion cache (docs/backends.md), which loads each model in torch and OpenVINO.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import __version__
from .config import ModelSpec, Settings
from .errors import ConfigError
from .prompts import resolve_prompts

# Settings field -> (environment variable, what the default means when it is not obvious).
SETTINGS_ENV: dict[str, tuple[str, str]] = {
    "models_file": ("EMBEDAPI_MODELS_FILE", "none: built-in models"),
    "device": ("EMBEDAPI_DEVICE", "auto: cuda, then mps, then cpu"),
    "api_keys": ("EMBEDAPI_API_KEYS", "none: no authentication"),
    "host": ("EMBEDAPI_HOST", ""),
    "port": ("APP_PORT", ""),
    "load_models": ("EMBEDAPI_LOAD_MODELS", "ignored under Gunicorn: each worker loads in post_fork"),
    "max_inputs": ("EMBEDAPI_MAX_INPUTS", ""),
    "max_documents": ("EMBEDAPI_MAX_DOCUMENTS", ""),
    "max_text_chars": ("EMBEDAPI_MAX_TEXT_CHARS", "per input, its prefix or instruction included"),
    "max_instruction_chars": ("EMBEDAPI_MAX_INSTRUCTION_CHARS", ""),
    "header_timeout_s": ("EMBEDAPI_HEADER_TIMEOUT", "seconds for the request line and headers"),
    "body_timeout_s": ("EMBEDAPI_BODY_TIMEOUT", "seconds a body may stall"),
    "body_min_rate": ("EMBEDAPI_BODY_MIN_RATE", "bytes/s after the body timeout's grace; 0: off"),
    "max_body_bytes": ("EMBEDAPI_MAX_BODY_BYTES", ""),
    "max_request_tokens": ("EMBEDAPI_MAX_REQUEST_TOKENS", "tokens fed per request, after truncation (400 above)"),
    "max_batch_tokens": ("EMBEDAPI_MAX_BATCH_TOKENS", "0: CPU 4096, GPU 16384"),
    "max_batch_size": ("EMBEDAPI_MAX_BATCH_SIZE", ""),
    "batch_wait_ms": ("EMBEDAPI_BATCH_WAIT_MS", ""),
    "max_queue_tokens": ("EMBEDAPI_MAX_QUEUE_TOKENS", ""),
    "batching": ("EMBEDAPI_BATCHING", ""),
    "request_timeout_s": ("EMBEDAPI_REQUEST_TIMEOUT", ""),
    "torch_threads": ("EMBEDAPI_TORCH_THREADS", "0: cores / workers"),
    "parallel_batches": ("EMBEDAPI_PARALLEL_BATCHES", "0: 2 on a CPU with 2+ torch threads, else 1"),
    "query_lanes": ("EMBEDAPI_QUERY_LANES", "-1: 1 on CPU, 0 on GPU (extra passes beside bulk work)"),
    "busy_wait_ms": ("EMBEDAPI_BUSY_WAIT_MS", "while bulk runs, other passes start at most this often"),
    "trace": ("EMBEDAPI_TRACE", "CPU: run models traced to TorchScript (pooling included) when they match eager"),
    "prepack": ("EMBEDAPI_PREPACK", "CPU torch: linear weights reordered once for oneDNN at load, if rows match"),
    "backend": ("EMBEDAPI_BACKEND", "torch; auto: OpenVINO on CPU if it passes the parity check, else torch"),
    "conversion_cache": ("EMBEDAPI_CONVERSION_CACHE", "$HF_HOME/embedapi/openvino; off: no cache"),
    "openvino_max_tokens": ("EMBEDAPI_OPENVINO_MAX_TOKENS", "wider batches run on torch; 0: all on OpenVINO"),
    "log_format": ("EMBEDAPI_LOG_FORMAT", ""),
    "log_level": ("EMBEDAPI_LOG_LEVEL", ""),
}

# Read by gunicorn.conf.py (process model), not by Settings.
GUNICORN_ENV: dict[str, tuple[str, str]] = {
    "workers": ("EMBEDAPI_WORKERS", "number of GPUs, 1 without GPU"),
    "threads": ("EMBEDAPI_THREADS", "64"),
    "worker_timeout": ("EMBEDAPI_WORKER_TIMEOUT", "300"),
    "graceful_timeout": ("EMBEDAPI_GRACEFUL_TIMEOUT", "60"),
    "preload_app": ("EMBEDAPI_PRELOAD", "true"),
    "metrics_dir": ("PROMETHEUS_MULTIPROC_DIR", "a fresh temporary directory"),
}

# Weights in formats the torch backend never reads: not fetched (use --all-files to get them anyway).
IGNORE_PATTERNS = ["*.onnx", "onnx/*", "openvino/*", "*.h5", "*.msgpack", "*.ot", "*.tflite",
                   "tf_model*", "flax_model*", "rust_model*", "coreml/*"]


def _source(env: Mapping[str, str], name: str) -> str:
    if name == "EMBEDAPI_API_KEYS" and env.get("EMBEDAPI_API_KEYS_FILE", "").strip():
        return "env EMBEDAPI_API_KEYS_FILE" + (" + EMBEDAPI_API_KEYS" if env.get(name, "").strip() else "")
    return f"env {name}" if env.get(name, "").strip() else "default"


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def _model_row(spec: ModelSpec) -> dict[str, Any]:
    preset, _ = resolve_prompts(spec.id, spec.prompts)
    return {
        "id": spec.id, "kind": spec.kind, "source": spec.source,
        "source_type": "local directory" if _is_local(spec.source) else "hub",
        "revision": spec.revision, "prompt_preset": preset if spec.kind == "embedding" else None,
        "max_seq_length": spec.max_seq_length, "dtype": spec.dtype, "backend": spec.backend or "(EMBEDAPI_BACKEND)",
        "normalize": spec.normalize,
        "aliases": list(spec.aliases), "matryoshka_dimensions": list(spec.matryoshka_dimensions),
    }


def resolved_config(env: Mapping[str, str]) -> dict[str, Any]:
    """What the server would run with, and where each value came from."""
    settings = Settings.from_env(env)
    out: dict[str, Any] = {"version": __version__, "settings": {}, "gunicorn": {}}
    for name, (var, note) in SETTINGS_ENV.items():
        value: Any = getattr(settings, name)
        if name == "api_keys":  # never print a key
            value = f"{len(value)} key(s) configured" if value else "none"
        out["settings"][name] = {"value": value, "source": _source(env, var), "env": var, "note": note}
    for name, (var, default) in GUNICORN_ENV.items():
        raw = env.get(var, "").strip()
        out["gunicorn"][name] = {"value": raw or default, "source": f"env {var}" if raw else "default", "env": var}
    out["models_source"] = (f"env EMBEDAPI_MODELS_FILE={settings.models_file}" if settings.models_file
                            else "built-in defaults")
    out["models"] = [_model_row(spec) for spec in settings.models]
    from huggingface_hub import constants

    out["huggingface"] = {"cache": constants.HF_HUB_CACHE, "offline": bool(constants.HF_HUB_OFFLINE)}
    return out


def cmd_config(args: argparse.Namespace) -> int:
    config = resolved_config(os.environ)
    if args.json:
        print(json.dumps(config, ensure_ascii=False, indent=2))
        return 0
    print(f"embedapi {config['version']}: resolved configuration")
    print("\nsettings (value, then where it came from):")
    for name, item in config["settings"].items():
        note = f"  [{item['note']}]" if item["note"] and item["source"] == "default" else ""
        print(f"  {name:<18} {str(item['value']):<28} {item['source']} ({item['env']}){note}")
    print("\ngunicorn (gunicorn.conf.py):")
    for name, item in config["gunicorn"].items():
        print(f"  {name:<18} {str(item['value']):<28} {item['source']} ({item['env']})")
    print(f"\nmodels ({config['models_source']}):")
    for m in config["models"]:
        extras = [f"source={m['source']} ({m['source_type']})", f"revision={m['revision'] or 'default'}",
                  f"dtype={m['dtype']}", f"backend={m['backend']}", f"max_seq_length={m['max_seq_length'] or 'model default'}"]
        if m["prompt_preset"]:
            extras.append(f"prompts={m['prompt_preset']}")
        if m["aliases"]:
            extras.append("aliases=" + ",".join(m["aliases"]))
        if m["matryoshka_dimensions"]:
            extras.append("matryoshka_dimensions=" + ",".join(map(str, m["matryoshka_dimensions"])))
        print(f"  {m['id']} [{m['kind']}]\n      " + "  ".join(extras))
    hf = config["huggingface"]
    print(f"\nhugging face cache: {hf['cache']}{'  (HF_HUB_OFFLINE: no downloads)' if hf['offline'] else ''}")
    return 0


@dataclass(frozen=True)
class Target:
    name: str
    source: str
    revision: str | None
    spec: ModelSpec | None = None  # the configured model it names (None: a hub id given as is)


def _targets(settings: Settings, names: Sequence[str], revision: str | None) -> list[Target]:
    """Configured models (all, or those named by id or alias); an unconfigured name is a hub id."""
    if not names:
        return [Target(s.id, s.source, revision or s.revision, s) for s in settings.models]
    by_name = {n: s for s in settings.models for n in (s.id, *s.aliases)}
    out = []
    for name in names:
        spec = by_name.get(name)
        out.append(Target(name, spec.source, revision or spec.revision, spec) if spec else Target(name, name, revision))
    return out


def _fetch(target: Target, all_files: bool) -> tuple[bool, str]:
    """(ok, message) for one model; never raises for a model-level problem."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, \
        RepositoryNotFoundError, RevisionNotFoundError

    if _is_local(target.source):
        return True, f"local, nothing to download ({target.source})"
    if target.source.startswith(("/", "./", "../", "~")):
        return False, f"the local directory {target.source} does not exist"
    where = f"{target.source}" + (f" at revision {target.revision}" if target.revision else "")
    try:
        path = snapshot_download(repo_id=target.source, revision=target.revision,
                                 ignore_patterns=None if all_files else IGNORE_PATTERNS)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            return False, (f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                           "forbids downloading it: run this without HF_HUB_OFFLINE where the hub is reachable, "
                           "or copy a cache that holds it (HF_HOME)")
        return False, (f"cannot reach the Hugging Face Hub for {where} and it is not in the cache "
                       f"({constants.HF_HUB_CACHE}): check the network or proxy (HTTPS_PROXY, HF_ENDPOINT)")
    except GatedRepoError:
        return False, f"{where} is gated: accept its terms on huggingface.co and set HF_TOKEN"
    except RepositoryNotFoundError:
        return False, (f"{target.source} does not exist on the Hugging Face Hub (or it is private: set HF_TOKEN); "
                       "check the id, or give an existing local directory as source")
    except RevisionNotFoundError:
        return False, f"{target.source} has no revision {target.revision!r}"
    except HFValidationError:
        return False, f"{target.source!r} is neither a Hugging Face repo id nor an existing local directory"
    except OSError as exc:  # disk full, permissions, HTTP errors
        return False, f"could not fetch {where}: {exc}"
    return True, f"{where} is in the cache: {path}"


def _convert(target: Target, settings: Settings) -> tuple[bool, str]:
    """(ok, message): the model's OpenVINO conversion built into (or found in) the conversion cache, through
    the loading path the server runs, parity check included."""
    if target.spec is None:
        return False, "not a configured model (its kind is unknown): add it to the models file to convert it"
    spec = replace(target.spec, revision=target.revision)
    if spec.backend == "torch":
        return True, 'its entry says backend = "torch": nothing to convert'
    if settings.conversion_cache_root is None:
        return False, "EMBEDAPI_CONVERSION_CACHE is off: there is no cache to build"
    from . import backends

    try:
        loaded = backends.load_runner(spec, "cpu", "openvino", trace=False, threads=0, streams=1,
                                      cache_root=settings.conversion_cache)
    except ConfigError as exc:
        return False, str(exc)
    except Exception as exc:  # the model's files, the exporter: one model's problem, reported
        return False, f"could not convert it ({type(exc).__name__}: {exc})"
    return True, f"OpenVINO conversion cache {loaded.runner.cache} under {settings.conversion_cache}"


def cmd_download(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    targets = _targets(settings, args.ids, args.revision)
    failed = 0
    for target in targets:
        print(f"{target.name}: fetching {target.source}" + (f"@{target.revision}" if target.revision else ""),
              file=sys.stderr, flush=True)
        ok, message = _fetch(target, args.all_files)
        if ok and args.convert:
            ok, converted = _convert(target, settings)
            message += f"; {converted}"
        failed += not ok
        print(f"{'ok' if ok else 'FAILED'} {target.name}: {message}", flush=True)
    if failed:
        print(f"{failed} of {len(targets)} model(s) could not be fetched" + (" or converted" if args.convert else ""),
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedapi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"embedapi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_config = sub.add_parser("config", help="print the resolved configuration and where each value came from")
    p_config.add_argument("--json", action="store_true", help="machine-readable output")
    p_config.set_defaults(func=cmd_config)
    p_download = sub.add_parser("download", help="fetch models into the Hugging Face cache ahead of time")
    p_download.add_argument("ids", nargs="*", help="model ids or aliases (default: every configured model); "
                                                   "an id that is not configured is fetched from the hub as is")
    p_download.add_argument("--revision", help="branch, tag or commit (default: the model's configured revision)")
    p_download.add_argument("--all-files", action="store_true",
                            help="also fetch ONNX / OpenVINO / TF / Flax weights the server never reads")
    p_download.add_argument("--convert", action="store_true",
                            help="also build the OpenVINO conversion cache (EMBEDAPI_CONVERSION_CACHE), so the "
                                 "first start on OpenVINO does not export")
    p_download.set_defaults(func=cmd_download)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
