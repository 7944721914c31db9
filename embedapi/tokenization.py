"""Tokenize once: the same ids serve truncation, usage counting and the forward pass."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from tokenizers import Tokenizer

from .errors import ClientGone

log = logging.getLogger(__name__)

# Concurrency comes from the request threads; a tokenizer fanning one request's texts out over every core
# competes with the forward passes and was slower while they kept the cores busy (docs/benchmarks.md).
# The environment wins.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `iter_ids` tokenizes a request's texts in pieces of about this many characters (plus one text). A tokenizer
# call holds ~150-200 bytes of intermediate state per token (tokens, offsets, masks) until it returns, so one
# call over a 32 MB body peaked at gigabytes; between pieces the caller's client-gone check runs.
TOKENIZE_CHUNK_CHARS = 131_072
# A lone text up to this long is tokenized holding the GIL (TextEncoder.ids): about 0.2 ms at most.
SINGLE_ENCODE_CHARS = 512


def bound_word_cache(backend: Tokenizer) -> bool:
    """Turn off a BPE model's word cache; True if it was one.

    Since tokenizers 0.23 that cache is per thread (up to 10,000 words in each, ~1-3 KB a word). A worker's 64
    request threads live as long as it does, so distinct texts grew it by hundreds of MB without end (64 threads,
    192,000 encodes of 20,000 texts: anonymous RSS 392 -> 565 MB and climbing; with the cache off 313 -> 314).
    A request thread's cache sees a sixty-fourth of the traffic, and short texts tokenized as fast without it
    (docs/operations.md). Unigram's cache is one for all threads and bounded: left as it is.
    """
    model = backend.model
    if type(model).__name__ != "BPE" or not hasattr(model, "_resize_cache"):  # older tokenizers: a shared cache
        return False
    model._resize_cache(0)
    return True


_PROBE_A = "テスト"
_PROBE_B = "サンプル"


def _find(haystack: list[int], needle: list[int], start: int = 0) -> int:
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i:i + len(needle)] == needle:
            return i
    raise ValueError("the tokenizer's special-token template could not be worked out")


class PairIds(list):
    """A (query, document) id sequence; `first_len` marks where the second segment starts."""

    first_len: int = 0


@dataclass(frozen=True)
class TokenTemplate:
    """The special tokens a tokenizer wraps around one text, or around a pair.

    Worked out once per model by comparing ids with and without special tokens, so it holds
    for any tokenizer (Ruri v3: `<s> A </s>` and `<s> A </s> <s> B </s>`).
    """

    head: tuple[int, ...]
    tail: tuple[int, ...]
    pair_head: tuple[int, ...]
    pair_mid: tuple[int, ...]
    pair_tail: tuple[int, ...]

    @classmethod
    def probe(cls, tokenizer: Any) -> "TokenTemplate":
        a = tokenizer(_PROBE_A, add_special_tokens=False)["input_ids"]
        b = tokenizer(_PROBE_B, add_special_tokens=False)["input_ids"]
        single = tokenizer(_PROBE_A)["input_ids"]
        i = _find(single, a)
        pair = tokenizer(_PROBE_A, _PROBE_B)["input_ids"]
        j = _find(pair, a)
        k = _find(pair, b, j + len(a))
        return cls(head=tuple(single[:i]), tail=tuple(single[i + len(a):]),
                   pair_head=tuple(pair[:j]), pair_mid=tuple(pair[j + len(a):k]),
                   pair_tail=tuple(pair[k + len(b):]))

    @property
    def single_overhead(self) -> int:
        return len(self.head) + len(self.tail)

    @property
    def pair_overhead(self) -> int:
        return len(self.pair_head) + len(self.pair_mid) + len(self.pair_tail)


class TextEncoder:
    """A model's tokenizer reduced to what the server needs: bare ids, then templates and cuts."""

    def __init__(self, tokenizer: Any, max_seq_length: int) -> None:
        self.template = TokenTemplate.probe(tokenizer)
        self.max_seq_length = max_seq_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A private copy with truncation and padding off: they are ours to do, on ids.
            self._backend: Tokenizer | None = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
            bound_word_cache(self._backend)
        else:
            self._backend = None
        self._tokenizer = tokenizer

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Bare token ids (no special tokens) of each text, in one batched call.

        One short text (a query, the commonest request) goes through `encode`, which keeps the GIL for its few
        microseconds; `encode_batch` releases it, and taking it back among the request threads costs more
        than the tokenization."""
        if self._backend is not None:
            if len(texts) == 1 and len(texts[0]) <= SINGLE_ENCODE_CHARS:
                return [self._backend.encode(texts[0], add_special_tokens=False).ids]
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def iter_ids(self, texts: Sequence[str], gone: Callable[[], bool] | None = None,
                 chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> Iterator[list[int]]:
        """Bare ids of each text in order, tokenized in pieces of ~`chunk_chars` characters.

        The peak memory of a request is then that of one piece, not of the whole request (the caller keeps
        only the truncated ids), and before each piece of a request of several `gone()` is asked: a departed
        client's request stops costing CPU (ClientGone).
        """
        total = sum(len(t) for t in texts)
        start = done = 0
        while start < len(texts):
            end, size = start, 0
            while end < len(texts) and (size < chunk_chars or end == start):
                size += len(texts[end])
                end += 1
            # Not before a lone piece: the request was read just now, and a check costs a system call.
            if gone is not None and (start > 0 or end < len(texts)) and gone():
                log.info("client gone: tokenization stopped after %d of %d characters (%d of %d texts)",
                         done, total, start, len(texts))
                raise ClientGone()
            yield from self.ids(texts[start:end])
            start, done = end, done + size

    def single(self, ids: Sequence[int], truncate: bool = True, left: bool = False, head: Sequence[int] = (),
               max_length: int | None = None) -> list[int] | None:
        """Wrap one text's ids in the template, cutting the tail to fit; None if too long and not truncating.

        The prefix is at the head of the ids, so cutting the tail keeps it. `left` cuts the text's start
        instead, keeping the leading run of ids that equals `head` (the prefix's ids). `max_length` (a
        request's own cap, special tokens included) may only lower the model's max_seq_length.
        """
        limit = self.max_seq_length if max_length is None else min(max_length, self.max_seq_length)
        budget = max(0, limit - self.template.single_overhead)
        if len(ids) > budget:
            if not truncate:
                return None
            if left:
                keep = 0
                while keep < min(len(head), budget) and ids[keep] == head[keep]:
                    keep += 1
                ids = [*ids[:keep], *ids[len(ids) - (budget - keep):]] if budget > keep else list(ids[:keep])
            else:
                ids = ids[:budget]
        return [*self.template.head, *ids, *self.template.tail]

    def pair(self, query: Sequence[int], doc: Sequence[int], left: bool = False) -> PairIds:
        """Wrap (query, document) ids; the document's tail goes first (its head with `left`), the query is
        cut only past half."""
        budget = self.max_seq_length - self.template.pair_overhead
        if len(query) + len(doc) > budget:
            q_keep = min(len(query), max(budget - len(doc), budget // 2))
            query = query[:q_keep]
            doc = doc[len(doc) - (budget - q_keep):] if left else doc[:budget - q_keep]
        t = self.template
        ids = PairIds([*t.pair_head, *query, *t.pair_mid, *doc, *t.pair_tail])
        ids.first_len = len(t.pair_head) + len(query) + len(t.pair_mid)
        return ids

    # -- what TEI's /tokenize and /decode show ----------------------------------------------
    def describe(self, text: str, seq: Sequence[int]) -> list[dict[str, Any]]:
        """The tokens of `seq` (a sequence `single` built from `text`) as TEI's /tokenize lists them:
        `{id, text, special, start, stop}`, start/stop byte offsets into the UTF-8 of `text` (null for
        special tokens), in the order the model reads them."""
        t = self.template
        head, tail = list(seq[:len(t.head)]), list(seq[len(seq) - len(t.tail):]) if t.tail else []
        body = list(seq[len(head):len(seq) - len(tail)])
        ids, offsets = self._encode_with_offsets(text)
        n, total = len(body), len(ids)
        if body == ids[:n]:
            kept = list(range(n))
        else:  # cut on the left: a leading run (the prefix, maybe empty), then the text's end
            common = 0
            while common < n and body[common] == ids[common]:
                common += 1
            keep = next(k for k in range(common + 1) if body[k:] == ids[total - (n - k):])
            kept = [*range(keep), *range(total - (n - keep), total)]
        cum = [0]
        for ch in text:
            cum.append(cum[-1] + len(ch.encode("utf-8")))

        def special(i: int) -> dict[str, Any]:
            return {"id": i, "text": self._token_text(i), "special": True, "start": None, "stop": None}

        out = [special(i) for i in head]
        for j in kept:
            start, stop = offsets[j] if offsets is not None else (None, None)
            piece = text[start:stop] if start is not None else self._token_text(ids[j])
            out.append({"id": ids[j], "text": piece, "special": False,
                        "start": None if start is None else cum[start], "stop": None if stop is None else cum[stop]})
        out.extend(special(i) for i in tail)
        return out

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if self._backend is not None:
            enc = self._backend.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        return self.ids([text])[0], None

    def _token_text(self, token_id: int) -> str:
        if self._backend is not None:
            return self._backend.id_to_token(token_id) or ""
        return str(self._tokenizer.convert_ids_to_tokens(token_id))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size() if self._backend is not None else len(self._tokenizer)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Token ids back to text (TEI's /decode); every id must be below vocab_size."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
