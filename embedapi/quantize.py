"""Quantized embeddings (Cohere's `embedding_types`): int8, uint8, binary, ubinary, base64, float.

`binary` / `ubinary` are the packed sign bits, exactly as sentence-transformers' `quantize_embeddings`
(`ubinary = np.packbits(v > 0)`, `binary = ubinary - 128`). `int8` is `round(v / step)` clipped to
±127 with one step per model (and output width / normalisation): the largest |value| the model gives
on the built-in calibration texts below (each with every prefix the model uses), measured once at
load, rounded up to two significant digits, divided by 127. Never the request's own batch, so a text gets the same codes whatever it is sent
with; and zero stays zero, so the raw codes are proportional to the floats and a vector database's
int8 dot product or cosine ranks as the floats do (sentence-transformers' per-dimension min/max
mapping shifts each dimension and kept a cosine of only ~0.81 with the floats). `uint8` = int8 + 128.
docs/dialects.md says what each type is for and how to rescore.
"""

from __future__ import annotations

import base64
import math
from typing import Any, Callable, Sequence

import numpy as np

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")

# Varied Japanese (news, how-to, questions, short labels, chat, technical, literary), so that each
# dimension's range covers what real inputs produce. Changing this list changes every int8 code.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "名古屋大学で開発された日本語の埋め込みモデルです。",
    "蔵王温泉は強酸性の硫黄泉で、肌がすべすべになると言われています。",
    "東京の明日の天気は晴れのち曇り、最高気温は十八度の予想です。",
    "日本銀行は政策金利を据え置くことを決めました。",
    "カレーの作り方：玉ねぎを飴色になるまで炒め、肉と野菜を加えて煮込みます。",
    "富士山の標高は何メートルですか？",
    "新幹線で東京から大阪までどのくらいかかりますか。",
    "量子コンピュータは重ね合わせと量子もつれを使って計算する。",
    "このエラーは、設定ファイルのパスが間違っている場合に発生します。",
    "Pythonでリストを逆順に並べ替えるにはreverse()を使います。",
    "吾輩は猫である。名前はまだ無い。",
    "春はあけぼの。やうやう白くなりゆく山ぎは、すこしあかりて。",
    "契約書の第三条に基づき、甲は乙に対して代金を支払うものとする。",
    "患者は三日前から発熱と咳があり、近くの診療所を受診した。",
    "サッカー日本代表はワールドカップ予選で三対一の勝利を収めた。",
    "おすすめのラーメン屋を教えてください。",
    "今日はありがとう！また来週会おうね。",
    "環境問題",
    "人工知能の進化",
    "京都の紅葉は十一月下旬が見頃です。",
    "株価指数は前日比で二パーセント下落し、三か月ぶりの安値となった。",
    "スマートフォンの電池が急に減るようになった原因は何でしょうか。",
    "図書館の開館時間は午前九時から午後八時までです。",
    "光合成とは、植物が光のエネルギーを使って二酸化炭素と水から糖を作る反応である。",
    "江戸時代の身分制度について簡単に説明してください。",
    "このホテルは駅から徒歩五分で、朝食の評判がとても良い。",
    "エンジンを始動する前に、シートベルトを着用してください。",
    "猫が好きか犬が好きか、それが問題だ。",
    "Kubernetesのポッドが再起動を繰り返す場合はログを確認しましょう。",
    "北海道では冬になると雪まつりが開かれ、多くの観光客が訪れる。",
    "締め切りは来週の金曜日ですので、それまでに提出をお願いします。",
    "深層学習モデルの学習には大量のデータと計算資源が必要になる。",
)


def calibration_inputs(prefixes: Sequence[str]) -> list[str]:
    """Every calibration text bare and with each distinct prefix the model uses."""
    distinct = list(dict.fromkeys(["", *prefixes]))
    return [p + t for p in distinct for t in CALIBRATION_TEXTS]


def shape(rows: np.ndarray, dims: int, normalize: bool) -> np.ndarray:
    """Rows as a request gets them: the first `dims` dimensions, then scaled to length 1 if `normalize`
    (the service's order; a zero row stays zero)."""
    rows = np.asarray(rows[:, :dims], dtype=np.float32)
    if normalize:
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(rows, dtype=np.float32)


class Quantizer:
    """One model's calibration rows (raw, full width) and the int8 step derived from them."""

    def __init__(self, calibration_rows: np.ndarray) -> None:
        self.rows = np.asarray(calibration_rows, dtype=np.float32)
        self._steps: dict[tuple[int, bool], np.float32] = {}

    @classmethod
    def measure(cls, encode: Callable[[list[str]], np.ndarray], prefixes: Sequence[str]) -> "Quantizer":
        """`encode(texts)` → the model's raw rows (the engine's forward pass)."""
        return cls(encode(calibration_inputs(prefixes)))

    def step(self, dims: int, normalize: bool) -> np.float32:
        """The value of one int8 unit for rows of this width and normalisation: max |calibration value| / 127."""
        key = (dims, normalize)
        found = self._steps.get(key)
        if found is None:
            found = self._steps[key] = np.float32(round_up(float(np.abs(shape(self.rows, dims, normalize)).max()))
                                                  / 127)
        return found


def round_up(peak: float) -> float:
    """`peak` rounded up to two significant digits (0.4922 → 0.5): workers on other devices or dtypes, whose
    calibration rows differ in the last bits, then (almost always) share the step and so the codes."""
    if not peak > 0:
        return 127.0  # a model that only gives zeros: any step will do
    unit = 10.0 ** (math.floor(math.log10(peak)) - 1)
    return math.ceil(peak / unit - 1e-9) * unit


def to_int8(rows: np.ndarray, step: np.float32) -> np.ndarray:
    """round(v / step), clipped to ±127 (a value beyond the calibration peak saturates)."""
    return np.clip(np.rint(rows / step), -127, 127).astype(np.int8)


def to_uint8(rows: np.ndarray, step: np.float32) -> np.ndarray:
    return (to_int8(rows, step).astype(np.int16) + 128).astype(np.uint8)


def to_ubinary(rows: np.ndarray) -> np.ndarray:
    return np.packbits(rows > 0, axis=-1)


def to_binary(rows: np.ndarray) -> np.ndarray:
    return (np.packbits(rows > 0, axis=-1) - 128).astype(np.int8)


def by_type(rows: np.ndarray, step: Callable[[], np.float32], types: Sequence[str]) -> dict[str, Any]:
    """Cohere's `embeddings` object: one list per requested type, rows in input order.
    `step()` is called only when int8/uint8 are asked for."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(types):
        if kind == "float":
            out["float"] = list(rows)
        elif kind == "int8":
            out["int8"] = list(to_int8(rows, step()))
        elif kind == "uint8":
            out["uint8"] = list(to_uint8(rows, step()))
        elif kind == "ubinary":
            out["ubinary"] = list(to_ubinary(rows))
        elif kind == "binary":
            out["binary"] = list(to_binary(rows))
        elif kind == "base64":
            out["base64"] = [base64.b64encode(r.astype("<f4", copy=False).tobytes()).decode("ascii") for r in rows]
    return out
