"""Prompt prefixes: presets, input_type aliases, precedence and the no-double-prefix rule."""

from __future__ import annotations

import unicodedata
from typing import Mapping

from .errors import ConfigError, InvalidRequest

INPUT_TYPES = ("query", "document", "classification", "clustering", "sts")

PRESETS: dict[str, dict[str, str]] = {
    "ruri-v3": {"query": "検索クエリ: ", "document": "検索文書: ", "classification": "トピック: ",
                "clustering": "トピック: ", "sts": ""},
    "ruri-v1": {"query": "クエリ: ", "document": "文章: ", "classification": "", "clustering": "", "sts": ""},
    "e5": {"query": "query: ", "document": "passage: ", "classification": "query: ",
           "clustering": "query: ", "sts": "query: "},
    "none": {t: "" for t in INPUT_TYPES},
}

INPUT_TYPE_ALIASES = {
    **{t: t for t in INPUT_TYPES},
    "search_query": "query",
    "retrieval.query": "query",
    "search_document": "document",
    "passage": "document",
    "retrieval.passage": "document",
    "text-matching": "sts",
    "separation": "clustering",
}


def default_preset(model_id: str) -> str:
    """Ruri v3 ids get `ruri-v3`, older Ruri ids `ruri-v1`, anything else `none`."""
    name = model_id.lower()
    if "ruri-v3" in name:
        return "ruri-v3"
    if "ruri-" in name:
        return "ruri-v1"
    if "multilingual-e5" in name or "glucose-base-ja-v2" in name:
        return "e5"
    return "none"


def resolve_prompts(model_id: str, prompts: str | Mapping[str, str] | None) -> tuple[str, dict[str, str]]:
    """Return (preset name, input_type → prefix) for a model entry's `prompts` value."""
    if prompts is None:
        name = default_preset(model_id)
        return name, dict(PRESETS[name])
    if isinstance(prompts, str):
        if prompts not in PRESETS:
            raise ConfigError(f"model {model_id}: unknown prompt preset {prompts!r}; presets are {sorted(PRESETS)}")
        return prompts, dict(PRESETS[prompts])
    table = {t: "" for t in INPUT_TYPES}
    for key, prefix in prompts.items():
        if key not in INPUT_TYPE_ALIASES:
            raise ConfigError(f"model {model_id}: prompts key {key!r} is not an input_type ({', '.join(INPUT_TYPES)})")
        table[INPUT_TYPE_ALIASES[key]] = str(prefix)
    return "custom", table


def canonical_input_type(value: str) -> str:
    """Map an input_type or one of its aliases to one of INPUT_TYPES, else a 400."""
    try:
        return INPUT_TYPE_ALIASES[value]
    except KeyError:
        raise InvalidRequest(
            f"input_type {value!r} is not supported; use one of {', '.join(INPUT_TYPE_ALIASES)}",
            param="input_type") from None


def choose_prefix(prefixes: Mapping[str, str], instruction_template: str, *, input_type: str | None,
                  instruction: str | None, apply_ruri_prefix: bool, input_is_string: bool) -> str:
    """Precedence: instruction > input_type > apply_ruri_prefix (string → query, array → document) > none."""
    if instruction:
        return instruction_template.replace("{instruction}", instruction)
    if input_type is not None:
        return prefixes[canonical_input_type(input_type)]
    if apply_ruri_prefix:
        return prefixes["query" if input_is_string else "document"]
    return ""


def with_prefix(prefix: str, text: str) -> str:
    """Prepend `prefix` unless the text already starts with it (compared after NFKC, trailing space optional)."""
    if not prefix:
        return text
    bare = unicodedata.normalize("NFKC", prefix).rstrip()
    if unicodedata.normalize("NFKC", text[: len(prefix) + 8]).startswith(bare):
        return text
    return prefix + text
