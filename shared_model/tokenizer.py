"""Report tokenizer: a fixed radiology lexicon shipped with the package, plus hashed buckets.

The vocabulary is never learned from a hospital's reports (that would leak their words):
every node builds the same id table from `radiology_vocab.json` and `vocab_size` alone, so
two nodes that agree on a `ModelConfig` agree on every token id.

Id layout for `Tokenizer(vocab_size)`::

    0 PAD | 1 BOS | 2 EOS | 3 EMPTY | 4 NUM | lexicon words, in file order | OOV buckets

A word outside the lexicon goes to bucket `blake2b(word) % num_buckets`: an unsalted,
process-independent hash (never Python's `hash()`, which is salted per process), so the
same unknown word gets the same id on every node and in every run.

Normalisation: Unicode NFKC, lower case, apostrophes dropped (``patient's`` ->
``patients``, ``don't`` -> ``dont``), then a word is a run of letters and a number is a
run of digits with an optional decimal part; everything else (whitespace, punctuation,
hyphens, slashes, underscores) separates tokens and is not a token. So ``well-defined``
-> ``well``, ``defined``; ``2.5cm`` -> ``2.5``, ``cm``; ``T12`` -> ``t``, ``12``. Every
number becomes the one NUM id.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable
from importlib import resources

import torch

PAD = 0
BOS = 1
EOS = 2
EMPTY = 3  # a report with no words (empty, or punctuation only); also "report hidden"
NUM = 4
NUM_SPECIALS = 5
MIN_BUCKETS = 64

VOCAB_PACKAGE = "shared_model"
VOCAB_FILE = "radiology_vocab.json"
NUM_TEXT = "<num>"

_APOSTROPHES = str.maketrans("", "", "'\u2018\u2019\u02bc`\u00b4")
# a number (digits, optional decimal part) or a run of letters (\w minus digits and "_")
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[^\W\d_]+")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_HASH_PERSON = b"medfuse-oov-v1"  # changing this re-maps every OOV word: a new model


def split_words(text: str) -> list[str]:
    """Normalised tokens of `text` (numbers kept as their digits; see the module doc)."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_APOSTROPHES)
    return _TOKEN_RE.findall(text)


def load_lexicon() -> list[str]:
    """The shipped word list, in file order, checked: each entry one normalised word, no
    duplicates, no numbers (a number is always NUM)."""
    text = resources.files(VOCAB_PACKAGE).joinpath(VOCAB_FILE).read_text(encoding="utf-8")
    words = [str(w) for w in json.loads(text)["words"]]
    seen: set[str] = set()
    for lineno, word in enumerate(words, start=1):
        if split_words(word) != [word] or _NUMBER_RE.fullmatch(word):
            raise ValueError(f"{VOCAB_FILE}: entry {lineno} {word!r} is not one normalised word")
        if word in seen:
            raise ValueError(f"{VOCAB_FILE}: entry {lineno} {word!r} is a duplicate")
        seen.add(word)
    return words


# What a report says about the request rather than the film: the examination header
# ("cxr:", "EXAMINATION: Chest radiograph, PA."), the indication or history ("hx ...",
# "Reason: chest pain.", "Clinical history: follow-up.") and the comparison. Each runs
# from its label to the end of its sentence or line.
_REQUEST_RE = re.compile(
    r"(?:^|(?<=[.:\n]))\s*"  # at the start of a sentence or after a label
    r"(?:(?:cxr|exam|examination|history|clinical history|indication|request|reason)\s*:"
    r"|hx\b|comparison\b)[^.\n]*[.\n]?",
    re.IGNORECASE | re.MULTILINE,
)


def describing_part(report: str) -> str:
    """The part of a report that describes the film: the report without its request
    (examination header, indication, history, comparison).

    The decoder writes from the image, and the image does not say why it was taken:
    a target that opens with "examination chest radiograph pa indication chest pain"
    taught it that boilerplate and the likeliest indication, while the finding fell past
    the length limit (15% distinct reports, clinical-efficacy F1 0.28 on the demo's
    hospitals, pooled). Report-generation work on IU X-ray and MIMIC-CXR (R2Gen and
    after) generates the findings and impression sections for the same reason."""
    return _REQUEST_RE.sub(" ", report)


def first_bucket_id() -> int:
    """The first OOV bucket id: ids from here to `vocab_size - 1` are hashed unknown words
    (decoded as "<oov:N>"), which a report decoder must never write. A function, not a
    `Tokenizer` property, so that it also answers for vocabularies too small for buckets
    (then no id is one)."""
    return NUM_SPECIALS + len(load_lexicon())


class Tokenizer:
    """Words -> ids with the shipped lexicon; out-of-vocabulary words -> hashed buckets."""

    def __init__(self, vocab_size: int) -> None:
        words = load_lexicon()
        self._first_bucket = NUM_SPECIALS + len(words)
        num_buckets = vocab_size - self._first_bucket
        if num_buckets < MIN_BUCKETS:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: {NUM_SPECIALS} special ids and "
                f"{len(words)} lexicon words leave {num_buckets} hash buckets, and at least "
                f"{MIN_BUCKETS} are needed; use vocab_size >= {self._first_bucket + MIN_BUCKETS}"
            )
        self._vocab_size = vocab_size
        self._num_buckets = num_buckets
        self._words: tuple[str, ...] = tuple(words)
        self._ids: dict[str, int] = {w: NUM_SPECIALS + i for i, w in enumerate(words)}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def num_buckets(self) -> int:
        return self._num_buckets

    @property
    def num_words(self) -> int:
        """Number of lexicon words (ids NUM_SPECIALS .. NUM_SPECIALS + num_words - 1)."""
        return len(self._words)

    def words(self, text: str) -> list[str]:
        """Normalised tokens of `text`; numbers stay as their digits here."""
        return split_words(text)

    def is_known(self, word: str) -> bool:
        """True when `word` (already normalised) is in the shipped lexicon."""
        return word in self._ids

    def token_id(self, word: str) -> int:
        """The id of one normalised token: NUM, its lexicon id, or its OOV bucket."""
        if _NUMBER_RE.fullmatch(word):
            return NUM
        known = self._ids.get(word)
        if known is not None:
            return known
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8, person=_HASH_PERSON)
        return self._first_bucket + int.from_bytes(digest.digest(), "big") % self._num_buckets

    def encode(self, text: str, max_len: int) -> list[int]:
        """Ids of the report's tokens, truncated to `max_len`; `[EMPTY]` when it has none."""
        _check_len(max_len, 1)
        ids = [self.token_id(w) for w in split_words(text)] or [EMPTY]
        return ids[:max_len]

    def encode_padded(self, text: str, max_len: int) -> torch.Tensor:
        """`encode` followed by PAD: a (max_len,) int64 tensor, never all PAD."""
        ids = self.encode(text, max_len)
        out = torch.full((max_len,), PAD, dtype=torch.int64)
        out[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def encode_target(self, text: str, max_len: int) -> torch.Tensor:
        """Decoder target, (max_len,) int64: BOS, ids of the report's describing part
        (`describing_part`, truncated to max_len - 2), EOS, PAD...

        A report with nothing to describe is BOS, EOS, PAD...: the decoder learns to stop
        at once (and `losses.token_loss` leaves it out).
        """
        _check_len(max_len, 2)
        ids = [self.token_id(w) for w in split_words(describing_part(text))][: max_len - 2]
        seq = [BOS, *ids, EOS]
        out = torch.full((max_len,), PAD, dtype=torch.int64)
        out[: len(seq)] = torch.tensor(seq, dtype=torch.int64)
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens for scoring: PAD, BOS and EMPTY skipped, stop at the first EOS; NUM ->
        "<num>", a bucket -> "<oov:N>" with N the bucket index (0 .. num_buckets - 1)."""
        out: list[str] = []
        for raw in ids:
            i = int(raw)
            if i == EOS:
                break
            if i in (PAD, BOS, EMPTY):
                continue
            if i == NUM:
                out.append(NUM_TEXT)
            elif NUM_SPECIALS <= i < self._first_bucket:
                out.append(self._words[i - NUM_SPECIALS])
            elif self._first_bucket <= i < self._vocab_size:
                out.append(f"<oov:{i - self._first_bucket}>")
            else:
                raise ValueError(f"token id {i} is outside 0..{self._vocab_size - 1}")
        return out


def _check_len(max_len: int, least: int) -> None:
    if max_len < least:
        raise ValueError(f"max_len={max_len} must be at least {least}")
