"""Quick self-checks for tests/synthetic_models.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

try:
    from tests.synthetic_models import PAD_ID, build_test_models
except ImportError:  # tests/ not importable as a package (e.g. plain `pytest` without rootdir on sys.path)
    from synthetic_models import PAD_ID, build_test_models


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_test_models(tmp_path_factory.mktemp("synthetic_models"))


def test_tokenizer_template_and_prefix(model_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dirs["embed"]))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        PAD_ID,
        4,
    )
    ids = tok("検索クエリ: 東京")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    a = tok("a", add_special_tokens=False)["input_ids"]
    b = tok("b", add_special_tokens=False)["input_ids"]
    assert tok("a", "b")["input_ids"] == [1, *a, 2, 1, *b, 2]
    for prefix in ("検索クエリ: ", "検索文書: ", "トピック: "):
        p = tok(prefix, add_special_tokens=False)["input_ids"]
        assert 1 <= len(p) <= 5 and 0 not in p
        text = "名古屋の温泉について教えてください。"
        full = tok(prefix + text, add_special_tokens=False)["input_ids"]
        assert full == p + tok(text, add_special_tokens=False)["input_ids"]


def test_sentence_transformer_encode(model_dirs: dict[str, Path]) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dirs["embed"]), device="cpu")
    emb = st.encode(["検索クエリ: 名古屋の温泉", "検索文書: 人工知能の研究", "a"], convert_to_numpy=True)
    assert emb.shape == (3, 64) and emb.dtype == np.float32
    assert np.abs(emb[0] - emb[1]).max() > 1e-2
    short = SentenceTransformer(str(model_dirs["embed-short"]), device="cpu")
    assert short.max_seq_length == 16
    assert short.preprocess(["名古屋" * 50])["input_ids"].shape == (1, 16)


def test_cross_encoder_predict(model_dirs: dict[str, Path]) -> None:
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(model_dirs["rerank"]), device="cpu")
    docs = ["名古屋の温泉", "東京は日本の首都です。", "人工知能の研究", "a"]
    scores = ce.predict([("検索クエリ: 名古屋の温泉", d) for d in docs])
    assert scores.shape == (4,)
    assert np.all((scores > 0) & (scores < 1))
    assert np.ptp(scores) > 1e-3
