"""Tokenizer: the shipped lexicon, id layout, OOV hashing, padding and decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import pytest
import torch

from shared_model.config import ModelConfig
from shared_model.tokenizer import (
    BOS,
    EMPTY,
    EOS,
    MIN_BUCKETS,
    NUM,
    NUM_SPECIALS,
    PAD,
    VOCAB_FILE,
    Tokenizer,
    describing_part,
)

OOV_WORDS = ["zorblax", "quuxitis", "flimflammery", "snarglepox"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ModelConfig().vocab_size)


def test_shipped_vocab_file_is_a_sorted_lexicon_of_1500_to_2200_words() -> None:
    # Prepare
    text = resources.files("shared_model").joinpath(VOCAB_FILE).read_text(encoding="utf-8")

    # Execute
    lines = json.loads(text)["words"]

    # Assert
    assert 1500 <= len(set(lines)) <= 2200
    assert len(lines) == len(set(lines))
    assert lines == sorted(lines)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in lines)
    for word in ("opacity", "consolidation", "effusion", "costophrenic", "no", "rll", "prior"):
        assert word in lines


def test_default_vocab_size_leaves_at_least_256_buckets(tok: Tokenizer) -> None:
    assert tok.vocab_size == 2560
    assert tok.num_buckets >= 256
    assert NUM_SPECIALS + tok.num_words + tok.num_buckets == tok.vocab_size


def test_special_ids() -> None:
    assert (PAD, BOS, EOS, EMPTY, NUM, NUM_SPECIALS) == (0, 1, 2, 3, 4, 5)


def test_too_small_vocab_size_is_refused(tok: Tokenizer) -> None:
    # Prepare
    smallest = NUM_SPECIALS + tok.num_words + MIN_BUCKETS

    # Execute / Assert
    assert Tokenizer(smallest).num_buckets == MIN_BUCKETS
    with pytest.raises(ValueError, match=f"vocab_size={smallest - 1} is too small"):
        Tokenizer(smallest - 1)


def test_words_normalise_case_unicode_hyphens_apostrophes_and_numbers(tok: Tokenizer) -> None:
    # NFKC turns the "ﬁ" ligature into "fi" and the full-width "１２" into "12".
    text = "Well-defined 2.5cm NODULE; patient's ﬁbrosis at T１２/L1, don’t"

    assert tok.words(text) == [
        "well",
        "defined",
        "2.5",
        "cm",
        "nodule",
        "patients",
        "fibrosis",
        "at",
        "t",
        "12",
        "l",
        "1",
        "dont",
    ]


def test_known_words_round_trip_through_decode(tok: Tokenizer) -> None:
    # Prepare
    text = "No focal consolidation, pleural effusion or pneumothorax. Heart size is normal."

    # Execute
    ids = tok.encode(text, 64)

    # Assert
    words = tok.words(text)
    assert all(tok.is_known(w) for w in words)
    assert all(NUM_SPECIALS <= i < NUM_SPECIALS + tok.num_words for i in ids)
    assert tok.decode(ids) == words


def test_numbers_become_num_and_decode_as_placeholder(tok: Tokenizer) -> None:
    ids = tok.encode("3.5 cm nodule, 12 mm", 10)

    assert ids[0] == NUM and ids[3] == NUM
    assert tok.decode(ids) == ["<num>", "cm", "nodule", "<num>", "mm"]


def test_oov_words_go_to_buckets_deterministically(tok: Tokenizer) -> None:
    # Prepare
    other = Tokenizer(tok.vocab_size)
    first_bucket = NUM_SPECIALS + tok.num_words

    # Execute
    ids = tok.encode(" ".join(OOV_WORDS), 10)

    # Assert
    assert ids == other.encode(" ".join(OOV_WORDS), 10)
    assert all(first_bucket <= i < tok.vocab_size for i in ids)
    assert not any(tok.is_known(w) for w in OOV_WORDS)
    assert tok.decode(ids) == [f"<oov:{i - first_bucket}>" for i in ids]


def test_oov_ids_do_not_depend_on_pythonhashseed(tok: Tokenizer) -> None:
    # Prepare: a child process whose str hash() salt differs from ours
    seed = "0" if os.environ.get("PYTHONHASHSEED") != "0" else "1"
    code = (
        "import json, sys\n"
        "from shared_model.tokenizer import Tokenizer\n"
        f"words = {OOV_WORDS!r}\n"
        "ids = Tokenizer(2560).encode(' '.join(words), 10)\n"
        "print(json.dumps({'ids': ids, 'hash': hash(words[0])}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}

    # Execute
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )

    # Assert
    child = json.loads(proc.stdout)
    assert child["hash"] != hash(OOV_WORDS[0]), "the child's hash() salt must differ"
    assert child["ids"] == tok.encode(" ".join(OOV_WORDS), 10)


@pytest.mark.parametrize("text", ["", "   ", "...; --", "\n"])
def test_a_report_without_words_encodes_as_empty(tok: Tokenizer, text: str) -> None:
    assert tok.encode(text, 8) == [EMPTY]
    assert tok.encode_padded(text, 4).tolist() == [EMPTY, PAD, PAD, PAD]
    assert tok.decode(tok.encode(text, 8)) == []


def test_encode_truncates_and_pads(tok: Tokenizer) -> None:
    # Prepare
    text = "the heart is normal in size"
    full = tok.encode(text, 64)

    # Execute
    short = tok.encode(text, 3)
    padded = tok.encode_padded(text, 8)

    # Assert
    assert len(full) == 6
    assert short == full[:3]
    assert padded.dtype == torch.int64 and padded.shape == (8,)
    assert padded.tolist() == full + [PAD, PAD]
    assert tok.encode_padded(text, 2).tolist() == full[:2]


def test_encode_target_layout(tok: Tokenizer) -> None:
    # Prepare
    heart, normal = tok.encode("heart normal", 2)

    # Execute
    target = tok.encode_target("Heart normal.", 6)
    empty = tok.encode_target("", 4)
    truncated = tok.encode_target("heart normal heart normal", 4)

    # Assert: BOS, ids, EOS, PAD...; truncation keeps room for BOS and EOS
    assert target.dtype == torch.int64
    assert target.tolist() == [BOS, heart, normal, EOS, PAD, PAD]
    assert empty.tolist() == [BOS, EOS, PAD, PAD]
    assert truncated.tolist() == [BOS, heart, normal, EOS]
    assert tok.decode(target.tolist()) == ["heart", "normal"]


def test_decode_skips_specials_and_stops_at_eos(tok: Tokenizer) -> None:
    heart = tok.encode("heart", 1)[0]

    assert tok.decode([BOS, PAD, heart, EMPTY, NUM, EOS, heart]) == ["heart", "<num>"]
    assert tok.decode(torch.tensor([BOS, heart, EOS])) == ["heart"]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_bad_max_len_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("heart", 0)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_target("heart", 1)


@pytest.mark.parametrize(("report", "described"), [
    ("cxr: hx line placement. hrt enlarged. no focal opacity.", "hrt enlarged. no focal opacity."),
    ("Exam: chest, AP portable. Reason: chest pain.\nLungs: nodule right mid zone, 23 mm.",
     "Lungs: nodule right mid zone, 23 mm."),
    ("EXAMINATION: Chest radiograph, PA.\nINDICATION: screening.\nFINDINGS: No effusion.",
     "FINDINGS: No effusion."),
    ("Clinical history: follow-up. Comparison with prior. Conclusion: normal.",
     "Conclusion: normal."),
    ("No history of effusion. Heart normal.", "No history of effusion. Heart normal."),
])
def test_the_decoder_target_is_what_describes_the_film(report: str, described: str) -> None:
    # the request (header, indication, history, comparison) is not in the image
    assert " ".join(describing_part(report).split()) == described


def test_encode_target_leaves_the_request_out(tok: Tokenizer) -> None:
    target = tok.encode_target("Reason: chest pain. Heart normal.", 6)
    assert tok.decode(target.tolist()) == ["heart", "normal"]
