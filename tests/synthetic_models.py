"""Tiny, deterministic, offline stand-ins for the Japanese Ruri v3 models.

Real weights cannot be downloaded in the test environment, so these helpers build
randomly initialised ModernBERT models (same architecture family and special-token
layout as Ruri v3) together with a small locally trained tokenizer.  Nothing here
depends on pytest, so benchmark scripts can import it as well::

    from tests.synthetic_models import build_test_models
    dirs = build_test_models(Path("/tmp/models"))   # {"embed": ..., "embed-short": ..., "rerank": ...}

Layout produced by :func:`build_embedding_model` mirrors a hub sentence-transformers
model: ``modules.json``, ``config_sentence_transformers.json``,
``sentence_bert_config.json`` (with ``max_seq_length``), ``config.json``,
``model.safetensors``, tokenizer files and ``1_Pooling/config.json`` (mean pooling,
no Normalize module).  :func:`build_reranker` produces a plain
``save_pretrained`` directory of ``ModernBertForSequenceClassification``
(``num_labels=1``) plus tokenizer, which ``CrossEncoder`` loads with a Sigmoid
activation by default.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertModel,
    PreTrainedTokenizerFast,
)

__all__ = [
    "SPECIAL_TOKENS",
    "PAD_ID",
    "RURI_V3_SHAPES",
    "corpus",
    "build_tokenizer",
    "build_embedding_model",
    "build_reranker",
    "build_test_models",
]

# Fixed special-token ids (same as Ruri v3 / sbintuitions modernbert-ja).
SPECIAL_TOKENS: list[str] = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = range(5)

_TOKENIZER_VOCAB_SIZE = 3000  # upper bound incl. 256 byte tokens; BPE stops earlier (~2130)
_MAX_TOKEN_CHARS = 4  # keeps token counts roughly proportional to text length (~2 chars/token)
_MODEL_MAX_LENGTH = 8192

# Shapes of the real models (for benchmark-sized random models).
RURI_V3_SHAPES: dict[str, dict[str, int]] = {
    "ruri-v3-30m": dict(
        hidden_size=256, num_hidden_layers=10, num_attention_heads=4, intermediate_size=1024, vocab_size=102400
    ),
    "ruri-v3-310m": dict(
        hidden_size=768, num_hidden_layers=25, num_attention_heads=12, intermediate_size=3072, vocab_size=102400
    ),
    "ruri-v3-reranker-310m": dict(
        hidden_size=768, num_hidden_layers=25, num_attention_heads=12, intermediate_size=3072, vocab_size=102400
    ),
}

# --------------------------------------------------------------------------------------
# Training text
# --------------------------------------------------------------------------------------

_SENTENCES: list[str] = [
    "名古屋は愛知県の県庁所在地で、中部地方の中心都市です。",
    "名古屋城の金のしゃちほこは有名な観光名所です。",
    "名古屋めしといえば、味噌カツやひつまぶし、手羽先が人気です。",
    "熱田神宮には三種の神器の一つである草薙剣が祀られています。",
    "温泉に入ると体が温まり、疲れが取れます。",
    "草津温泉は湯畑で知られる日本有数の温泉地です。",
    "下呂温泉は岐阜県にあり、日本三名泉の一つに数えられます。",
    "露天風呂から見える雪景色はとても美しかった。",
    "人工知能の研究は近年急速に進歩している。",
    "大規模言語モデルは大量のテキストから学習されます。",
    "機械学習では訓練データと評価データを分けることが重要です。",
    "深層学習のモデルはGPUを使って高速に学習できます。",
    "文埋め込みモデルは文章の意味をベクトルで表現します。",
    "検索システムはクエリに関連する文書を上位に表示します。",
    "情報検索の評価にはnDCGやMRRなどの指標が使われます。",
    "リランカーは検索結果の順位を並べ替えて精度を高めます。",
    "瑠璃色は深い青色のことで、宝石のラピスラズリに由来します。",
    "東京は日本の首都であり、世界有数の大都市です。",
    "京都には多くの寺社仏閣があり、毎年多くの観光客が訪れます。",
    "大阪はたこ焼きやお好み焼きなどの食文化で知られています。",
    "北海道の冬は寒く、雪まつりが開催されます。",
    "富士山は日本で最も高い山で、標高は3776メートルです。",
    "沖縄の海は透明度が高く、ダイビングに最適です。",
    "新幹線を使えば東京から名古屋まで約1時間40分で移動できます。",
    "今日は朝から雨が降っていたので、家で本を読みました。",
    "明日の天気は晴れのち曇り、最高気温は25度の予報です。",
    "私は毎朝コーヒーを飲んでから仕事を始めます。",
    "週末は友達と映画を見に行く予定です。",
    "日本語の文章には漢字、ひらがな、カタカナが混在します。",
    "このアプリケーションはFlaskとGunicornで動作します。",
    "APIはOpenAI互換のエンドポイントを提供します。",
    "ベクトルの次元数はモデルによって異なります。",
    "コサイン類似度は二つのベクトルの角度から計算されます。",
    "トークナイザーは文章をトークンの列に分割します。",
    "最大系列長を超える入力は切り詰められます。",
    "バッチ処理によって推論の効率を上げることができます。",
    "猫が窓辺で気持ちよさそうに昼寝をしている。",
    "犬と一緒に公園を散歩するのが日課です。",
    "桜の花が咲く季節になると、多くの人が花見を楽しみます。",
    "紅葉の時期の京都はとても混雑します。",
    "ラーメンの麺は小麦粉から作られています。",
    "寿司は日本を代表する料理の一つです。",
    "電車が遅れたため、会議に少し遅刻してしまった。",
    "図書館で資料を探して、レポートを書きました。",
    "彼女はピアノを弾くのがとても上手だ。",
    "子供たちは運動会に向けて毎日練習している。",
    "経済の成長率は前年比で2.5%増加した。",
    "新しいスマートフォンは2024年に発売されました。",
    "ご質問があれば、お気軽にお問い合わせください。",
    "よろしくお願いいたします。ありがとうございました！",
    "なぜ空は青いのでしょうか？",
    "「吾輩は猫である」は夏目漱石の小説です。",
    "（注）価格はすべて税込みです。",
    "会議は午前10時〜午後3時まで行われます。",
    "住所：愛知県名古屋市千種区不老町",
    "電話番号：052-123-4567",
    "量子コンピュータは従来の計算機では難しい問題を解く可能性がある。",
    "自然言語処理の分野では、翻訳や要約、質問応答などの課題が研究されている。",
    "日本の人口は約一億二千万人で、少子高齢化が進んでいます。",
    "地震や台風などの自然災害に備えて、非常食を準備しておきましょう。",
    "野球とサッカーは日本で特に人気のあるスポーツです。",
    "彼は大学で物理学を専攻し、卒業後は研究所に就職した。",
    "医師は患者の症状を詳しく聞いてから診断を下した。",
    "環境問題を解決するためには、再生可能エネルギーの普及が欠かせない。",
    "郵便局で荷物を送る手続きをしました。",
    "駅前の喫茶店で待ち合わせをしましょう。",
    "このレストランの料理は値段の割にとても美味しい。",
    "小説を読むことで、想像力や語彙力が豊かになる。",
    "夏休みには家族で海外旅行に出かけました。",
    "祖母の家の庭には柿の木が植えられている。",
    "政府は新しい経済対策を発表した。",
    "株価が急落し、投資家の間に不安が広がった。",
    "学生たちは期末試験に向けて熱心に勉強している。",
    "歴史的な建物を保存するための取り組みが進められている。",
    "宇宙飛行士は国際宇宙ステーションで様々な実験を行います。",
    "味噌汁と焼き魚、白いご飯は典型的な和食の朝ごはんです。",
    "森の中を歩くと、鳥の声や川のせせらぎが聞こえてきた。",
    "携帯電話の電池がすぐに切れてしまうので困っている。",
    "病院の受付は午前八時半から始まります。",
    "昔々、ある村におじいさんとおばあさんが住んでいました。",
    "雨上がりの空に大きな虹がかかっていた。",
    "データベースから必要な情報を取り出すにはSQLを使います。",
    "ソフトウェアの不具合を修正して、新しい版を公開した。",
    "電気自動車の販売台数は年々増えている。",
    "伝統工芸品の職人は後継者不足に悩んでいる。",
    "美しい着物を着て、成人式に参加しました。",
]

_ASCII_LINES: list[str] = [
    "The quick brown fox jumps over the lazy dog.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!",
    "Hello, world! This is a test of the embedding API (v1).",
    "query: what is the capital of Japan? passage: Tokyo is the capital.",
    "Ruri v3 is a Japanese text embedding model based on ModernBERT.",
    "0123456789 3.14159 2024-01-01 12:34:56 100% #1 $5 @user a_b c-d e/f",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "http://example.com/index.html?q=search&lang=ja",
    "model=ruri-v3-310m input=[\"text\"] encoding_format=float",
]

_PREFIXES: list[str] = ["検索クエリ: ", "検索文書: ", "トピック: ", "", "", ""]

_PLACES = [
    "名古屋", "東京", "京都", "大阪", "札幌", "福岡", "草津", "下呂", "箱根", "別府",
    "横浜", "神戸", "仙台", "広島", "金沢", "奈良", "鎌倉", "長崎", "熊本", "那覇",
]  # fmt: skip
_THINGS = [
    "温泉", "人工知能", "検索", "ラーメン", "お城", "美術館", "新幹線", "天気", "桜", "図書館",
    "大学", "病院", "博物館", "動物園", "水族館", "商店街", "祭り", "空港", "港", "公園",
]  # fmt: skip
_PATTERNS = [
    "{p}の{t}について教えてください。",
    "{p}で{t}を楽しみました。",
    "{t}といえば{p}が有名です。",
    "{p}にある{t}の情報を検索する",
    "{p}の{t}はどうですか？",
    "{p}駅から{t}までの行き方",
    "おすすめの{t}を{p}で探しています",
]

# Characters that should always be in the vocabulary, even if rare in the corpus.
_ALPHABET: list[str] = sorted(
    set(
        [chr(c) for c in range(0x21, 0x7F)]  # printable ASCII
        + [chr(c) for c in range(0x3041, 0x3097)]  # hiragana
        + [chr(c) for c in range(0x30A1, 0x30FB)]  # katakana
        + list("ー、。・「」『』（）！？：；，．〜…　")
        + [" ", "\n", "\t"]
    )
)


def corpus() -> list[str]:
    """Return the deterministic list of training lines used for the tokenizer."""
    lines: list[str] = []
    for prefix, sentence in itertools.product(_PREFIXES, _SENTENCES + _ASCII_LINES):
        lines.append(prefix + sentence)
    for prefix, (place, thing), pattern in itertools.product(
        _PREFIXES[:4], itertools.product(_PLACES, _THINGS), _PATTERNS
    ):
        lines.append(prefix + pattern.format(p=place, t=thing))
    lines.append("".join(_ALPHABET))
    lines.append("改行を含む\n文章と\tタブ、全角　スペース")
    return lines


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def build_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a small deterministic BPE tokenizer and ``save_pretrained`` it into ``out_dir``.

    * Model: character-level BPE (no byte-level mapping, tokens of at most 4 characters,
      ``min_frequency=2``) trained on :func:`corpus`, plus 256 ``<0xNN>`` byte tokens with
      SentencePiece-style byte fallback: ~2130 ids in total, ~2 characters per token on
      Japanese text.  BPE training is deterministic (identical tokenizer.json in every
      process); the tokenizers Unigram trainer is not (HashMap order → score/order jitter).
      Characters never seen in training become UTF-8 byte tokens, so ``<unk>`` (id 0) is
      never produced.  All printable ASCII, hiragana, katakana and common full-width
      punctuation (incl. "："), space, tab, newline and U+3000 are single pieces.
    * No normalizer (text is tokenized verbatim, " a " != "a").
    * Pre-tokenizer: ``Split(\\s, "isolated")`` then ``Punctuation("isolated")``: every
      whitespace character and every punctuation character is its own pre-token.
      Hence a prefix ending in a whitespace char ("検索クエリ: ", "検索文書: ",
      "トピック: ") is always a token boundary, and
      ``ids(prefix + text) == ids(prefix) + ids(text)`` for *any* text.
    * Decoder: ``ByteFallback`` + ``Fuse`` (decode reproduces the text exactly).
    * Special tokens with fixed ids ``<unk>=0 <s>=1 </s>=2 <pad>=3 <mask>=4``.
    * Post-processor (Ruri v3 template): single ``<s> $A </s>``,
      pair ``<s> $A </s> <s> $B </s>``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB_SIZE - 256,
        min_frequency=2,
        max_token_length=_MAX_TOKEN_CHARS,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_ALPHABET,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)

    # SentencePiece-style byte fallback: append <0x00>..<0xFF> after the trained vocab so that
    # characters never seen in training become UTF-8 byte tokens instead of <unk>.
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = json.loads(decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()]).__getstate__())
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))

    for idx, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == idx, (token, tok.token_to_id(token))

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> <s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=_MODEL_MAX_LENGTH,
        padding_side="right",
        truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def _load_tokenizer(tokenizer_dir: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer previously written by :func:`build_tokenizer`."""
    return PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))


def _get_tokenizer(tokenizer_dir: str | Path | None, scratch: Path) -> PreTrainedTokenizerFast:
    if tokenizer_dir is None:
        return build_tokenizer(scratch / "tokenizer")
    return _load_tokenizer(tokenizer_dir)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Temporarily disable transformers' "Loading weights"/"Writing model shards" bars."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _ruri_config(
    *,
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    **extra,
) -> ModernBertConfig:
    """A ``ModernBertConfig`` with Ruri v3's non-size hyper-parameters."""
    return ModernBertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        global_attn_every_n_layers=3,
        local_attention=128,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        cls_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        sep_token_id=EOS_ID,
        hidden_activation="gelu",
        norm_eps=1e-5,
        norm_bias=False,
        dtype="float32",
        **extra,
    )


def _resolve_vocab_size(vocab_size: int | None, tokenizer: PreTrainedTokenizerFast) -> int:
    n = len(tokenizer)
    if vocab_size is None:
        return n
    if vocab_size < n:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n} tokens)")
    return vocab_size


def build_embedding_model(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 8192,
    max_seq_length: int = 8192,
    seed: int = 0,
) -> Path:
    """Build a seeded random ``ModernBertModel`` + mean Pooling sentence-transformers model.

    ``vocab_size`` defaults to the tokenizer size (may be larger, e.g. 102400 for benchmarks;
    ids beyond the tokenizer are just never produced).  ``max_seq_length`` is written both to
    ``sentence_bert_config.json`` (like hub models) and to the tokenizer's ``model_max_length``
    (where ST 6 keeps it).  Returns ``out_dir``; load with
    ``SentenceTransformer(str(out_dir), device="cpu")``.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synthetic_embed_") as tmp, _quiet_progress_bars():
        tmp_path = Path(tmp)
        tokenizer = _get_tokenizer(tokenizer_dir, tmp_path)
        config = _ruri_config(
            vocab_size=_resolve_vocab_size(vocab_size, tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ModernBertModel(config).to(torch.float32).eval()

        hf_dir = tmp_path / "hf"
        model.save_pretrained(str(hf_dir))
        tokenizer.save_pretrained(str(hf_dir))

        transformer = Transformer(str(hf_dir), max_seq_length=max_seq_length)
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        st = SentenceTransformer(modules=[transformer, pooling], device="cpu")
        st.save(str(out_dir))

    # Hub-style sentence_bert_config.json (ST 6 drops max_seq_length from it otherwise).
    sb_path = out_dir / "sentence_bert_config.json"
    sb_config = json.loads(sb_path.read_text()) if sb_path.exists() else {}
    sb_config = {"max_seq_length": max_seq_length, "do_lower_case": False, **sb_config}
    sb_path.write_text(json.dumps(sb_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def build_reranker(
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 8192,
    classifier_pooling: str = "mean",
    seed: int = 1,
) -> Path:
    """Build a seeded random ``ModernBertForSequenceClassification`` (``num_labels=1``).

    Saved with ``save_pretrained`` + tokenizer, so ``CrossEncoder(str(out_dir), device="cpu")``
    loads it offline; ``predict`` returns sigmoid scores in (0, 1).  ``classifier_pooling``
    defaults to ``"mean"`` because with ``"cls"`` a randomly initialised model gives nearly
    identical logits for all documents (spread ~0.006 vs ~1.4 with mean pooling).  If the
    classifier weight were all zeros it is re-initialised from the seed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="synthetic_rerank_") as tmp, _quiet_progress_bars():
        tokenizer = _get_tokenizer(tokenizer_dir, Path(tmp))
        config = _ruri_config(
            vocab_size=_resolve_vocab_size(vocab_size, tokenizer),
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            num_labels=1,
            classifier_pooling=classifier_pooling,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ModernBertForSequenceClassification(config).to(torch.float32).eval()
            # Make sure the head is not degenerate (all-equal scores).
            with torch.no_grad():
                if float(model.classifier.weight.abs().max()) == 0.0:
                    torch.nn.init.normal_(model.classifier.weight, std=hidden_size**-0.5)
                    if model.classifier.bias is not None:
                        torch.nn.init.zeros_(model.classifier.bias)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


def build_test_models(root: str | Path) -> dict[str, Path]:
    """Build the tokenizer once plus small ``embed``, ``embed-short`` (max_seq_length=16) and
    ``rerank`` models under ``root``; return ``{"embed": dir, "embed-short": dir, "rerank": dir}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir)
    return {
        "embed": build_embedding_model(root / "embed", tokenizer_dir=tok_dir, seed=0),
        "embed-short": build_embedding_model(root / "embed-short", tokenizer_dir=tok_dir, max_seq_length=16, seed=2),
        "rerank": build_reranker(root / "rerank", tokenizer_dir=tok_dir, seed=1),
    }
