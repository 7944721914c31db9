"""Configuration: the models TOML, environment variables, prompt presets and the prefix rules."""

from __future__ import annotations

import pytest

from embedapi.config import DEFAULT_MODELS, Settings, load_model_specs
from embedapi.errors import ConfigError, InvalidRequest
from embedapi.prompts import choose_prefix, default_preset, resolve_prompts, with_prefix


def write(tmp_path, text):
    path = tmp_path / "models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_models_are_the_three_ruri_v3_models():
    specs = load_model_specs(None)
    assert [(s.id, s.kind) for s in specs] == [(m["id"], m["kind"]) for m in DEFAULT_MODELS]
    assert {s.id for s in specs} == {"cl-nagoya/ruri-v3-30m", "cl-nagoya/ruri-v3-310m",
                                    "cl-nagoya/ruri-v3-reranker-310m"}
    assert all(s.source == s.id and not s.trust_remote_code for s in specs)


def test_full_entry_is_read(tmp_path):
    path = write(tmp_path, '''
[[models]]
id = "my-embedder"
source = "/models/ruri"
kind = "embedding"
revision = "abc123"
prompts = { query = "Q: ", passage = "D: " }
max_seq_length = 512
normalize = false
dtype = "float32"
aliases = ["text-embedding-3-small"]
matryoshka_dimensions = [128, 64]
instruction_template = "Instruct: {instruction}\\n"
''')
    (spec,) = load_model_specs(path)
    assert spec.source == "/models/ruri" and spec.revision == "abc123" and spec.max_seq_length == 512
    assert spec.normalize is False and spec.aliases == ("text-embedding-3-small",)
    assert spec.matryoshka_dimensions == (128, 64)
    preset, prefixes = resolve_prompts(spec.id, spec.prompts)
    assert preset == "custom" and prefixes["query"] == "Q: " and prefixes["document"] == "D: "


@pytest.mark.parametrize("body,needle", [
    ('[[models]]\nkind = "embedding"', "'id'"),
    ('[[models]]\nid = "a"\nkind = "chat"', "kind"),
    ('[[models]]\nid = "a"\ndtype = "int4"', "dtype"),
    ('[[models]]\nid = "a"\ncolour = "red"', "unknown keys"),
    ('[[models]]\nid = "a"\ninstruction_template = "no placeholder"', "instruction_template"),
    ('[[models]]\nid = "a"\n[[models]]\nid = "b"\naliases = ["a"]', "used twice"),
    ('[[models]]\nid = "a"\nmax_seq_length = 2', "max_seq_length"),
    ("models = 3", "[[models]]"),
    ("not toml at all [", "not valid TOML"),
])
def test_bad_models_file_is_refused_at_start_with_a_clear_message(tmp_path, body, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        load_model_specs(write(tmp_path, body))
    assert needle in str(exc.value)


def test_missing_models_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_specs(tmp_path / "nope.toml")


def test_environment_variables(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nk-file\n\n")
    env = {"EMBEDAPI_DEVICE": "cuda:1", "EMBEDAPI_API_KEYS": "k1, k2,", "EMBEDAPI_API_KEYS_FILE": str(keys),
           "APP_PORT": "9000", "EMBEDAPI_MAX_INPUTS": "10", "EMBEDAPI_BATCHING": "false",
           "EMBEDAPI_LOG_FORMAT": "json", "EMBEDAPI_PARALLEL_BATCHES": "3", "EMBEDAPI_TRACE": "off"}
    s = Settings.from_env(env)
    assert s.device == "cuda:1" and s.api_keys == ("k1", "k2", "k-file") and s.port == 9000
    assert s.max_inputs == 10 and s.batching is False and s.log_format == "json" and s.parallel_batches == 3
    assert s.trace is False
    defaults = Settings.from_env({})
    assert defaults.port == 8000 and defaults.device == "auto" and defaults.api_keys == ()
    assert defaults.parallel_batches == 0  # the device decides
    assert defaults.trace is True


@pytest.mark.parametrize("env", [{"APP_PORT": "eighty"}, {"EMBEDAPI_BATCHING": "perhaps"},
                                 {"EMBEDAPI_LOG_FORMAT": "xml"}, {"EMBEDAPI_LOAD_MODELS": "lazy"}])
def test_bad_environment_values(env):
    with pytest.raises(ConfigError):
        Settings.from_env(env)


@pytest.mark.parametrize("model_id,preset", [
    ("cl-nagoya/ruri-v3-310m", "ruri-v3"), ("cl-nagoya/ruri-v3-30m", "ruri-v3"),
    ("cl-nagoya/ruri-large", "ruri-v1"), ("cl-nagoya/ruri-base-v2", "ruri-v1"),
    ("intfloat/multilingual-e5-large", "e5"), ("pkshatech/GLuCoSE-base-ja-v2", "e5"),
    ("BAAI/bge-m3", "none"),
])
def test_default_presets_by_model_id(model_id, preset):
    assert default_preset(model_id) == preset


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError):
        resolve_prompts("x", "ruri-v9")


def test_prefix_precedence_and_aliases():
    _, table = resolve_prompts("cl-nagoya/ruri-v3-310m", None)
    args = dict(input_type=None, instruction=None, apply_ruri_prefix=False, input_is_string=True)
    assert choose_prefix(table, "{instruction}", **args) == ""
    assert choose_prefix(table, "{instruction}", **{**args, "apply_ruri_prefix": True}) == "検索クエリ: "
    assert choose_prefix(table, "{instruction}", **{**args, "apply_ruri_prefix": True,
                                                    "input_is_string": False}) == "検索文書: "
    assert choose_prefix(table, "{instruction}", **{**args, "input_type": "retrieval.passage",
                                                    "apply_ruri_prefix": True}) == "検索文書: "
    assert choose_prefix(table, "<{instruction}>", **{**args, "input_type": "query",
                                                      "instruction": "探す"}) == "<探す>"
    with pytest.raises(InvalidRequest) as exc:
        choose_prefix(table, "{instruction}", **{**args, "input_type": "question"})
    assert exc.value.param == "input_type" and "search_query" in exc.value.message


@pytest.mark.parametrize("text,expected", [
    ("東京", "検索クエリ: 東京"),
    ("検索クエリ: 東京", "検索クエリ: 東京"),
    ("検索クエリ：東京", "検索クエリ：東京"),
    ("検索クエリ:東京", "検索クエリ:東京"),
    ("検索文書: 東京", "検索クエリ: 検索文書: 東京"),
    ("検索", "検索クエリ: 検索"),
])
def test_no_double_prefix_after_nfkc(text, expected):
    assert with_prefix("検索クエリ: ", text) == expected


def test_empty_prefix_leaves_text_alone():
    assert with_prefix("", " x ") == " x "
