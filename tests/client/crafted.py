"""What a curious coordinator can build, for tests that run its attacks on the product.

The coordinator writes the server code and crafts the global model it sends; it does not
see a site's data. These helpers make (a) two neighbouring sites, one case apart, and (b)
global models that act on that one case: a NaN trigger (every output of a case whose
report holds a chosen word is NaN, every other case's is finite, every weight is finite)
and a decoder that stops at once (EOS as its first token, whatever the input).

Test helpers only: plain functions of their arguments, nothing cached.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from shared_model.config import MANIFEST
from shared_model.tokenizer import EOS, Tokenizer, split_words

TARGET_ID = "target-00"
TRIGGER_CANDIDATES = ("zyzzogeton", "quixotry", "xylarium", "jentacular", "snollygoster")
# The trigger's score is OVERFLOW + OVERFLOW = +inf in float32 (max 3.4028e38); every other
# case's is OVERFLOW - OVERFLOW = 0. Each term alone stays finite.
OVERFLOW = 1.75e38


# ----------------------------------------------------------------- neighbouring sites


def manifest_rows(site: Path) -> tuple[list[str], list[dict[str, str]]]:
    with (site / MANIFEST).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_manifest_rows(site: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with (site / MANIFEST).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def unique_word(site: Path, tokenizer: Tokenizer) -> str:
    """A word whose token id (lexicon or hashed bucket) no report of `site` uses, so that
    a trigger on that id fires for the target case alone."""
    _, rows = manifest_rows(site)
    used = {tokenizer.token_id(w) for r in rows for w in split_words(r["report"])}
    return next(w for w in TRIGGER_CANDIDATES if tokenizer.token_id(w) not in used)


def neighbouring_sites(source: Path, out: Path, word: str) -> tuple[Path, Path]:
    """(site_in, site_out): `site_out` a copy of the site folder `source` (format v1, e.g.
    a `tiny_federation` site: 40 synthetic cases, 32 px), `site_in` the same plus one
    target case (`TARGET_ID`, in the train split, a copy of a train case's image) whose
    report starts with `word`. Both folders carry the source's name (under `out/in`,
    `out/out`), so the two nodes look alike in everything but the one case."""
    fields, rows = manifest_rows(source)
    for name in ("case_id", "image", "report", "label", "split"):
        if name not in fields:
            fields.append(name)
    model = next(r for r in rows if r.get("split", "train") in ("train", ""))
    site_in, site_out = out / "in" / source.name, out / "out" / source.name
    shutil.copytree(source, site_out)
    shutil.copytree(source, site_in)
    image = Path(model["image"]).with_name(f"{TARGET_ID}{Path(model['image']).suffix}")
    shutil.copyfile(source / model["image"], site_in / image)
    target = {**model, "case_id": TARGET_ID, "image": image.as_posix(), "split": "train",
              "report": f"{word} {model['report']}"}
    write_manifest_rows(site_in, fields, [*rows, target])
    return site_in, site_out


# ----------------------------------------------------------------- crafted global models


def nan_trigger_state(global_state: Mapping[str, torch.Tensor],
                      word: str) -> dict[str, torch.Tensor]:
    """`global_state` rewired so that the report encoder's attention score of `word` is
    +inf (then softmax, and every output of the case, is NaN), every other token's 0.

    Every weight stays finite, so an update trained on a site without the word is finite
    and one trained with it is NaN, unless training drops NaN per-sample gradients (a
    NaN-weight trigger would make every update NaN, target or not). The circuit, in the
    forward direction's LSTM unit 0 and attention rows 0, 1:

    - embedding column 0 is +1 for `word`, -1 for every other token;
    - unit 0's input, cell and output gates read that column alone (weight 100): h0 is
      tanh(1) or more at the word, 0 (to 1e-40) at every other token;
    - attention row 0 is tanh(100 h0 - 50): exactly +1 at the word, exactly -1
      elsewhere; row 1 is tanh(50) = 1 everywhere;
    - the score is OVERFLOW * (row 0 + row 1): inf at the word, 0 elsewhere. Elsewhere
      both rows are saturated (tanh' = 0 exactly), so no other case's gradient grows.
    """
    state = {k: v.detach().clone() for k, v in global_state.items()}
    tokenizer = Tokenizer(state["text.embed.weight"].shape[0])
    hidden = state["text.lstm.weight_hh_l0"].shape[1]
    i, f, g, o = (k * hidden for k in range(4))  # unit 0's rows of the i, f, g, o gates

    embed = state["text.embed.weight"]
    embed[:, 0] = -1.0
    embed[tokenizer.token_id(word), 0] = 1.0
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        state[f"text.lstm.{name}"][[i, f, g, o]] = 0.0
    state["text.lstm.weight_ih_l0"][[i, g, o], 0] = 100.0

    proj_w, proj_b = state["text.att_proj.weight"], state["text.att_proj.bias"]
    proj_w[:2] = 0.0
    proj_w[0, 0] = 100.0  # forward unit 0 is column 0 of the (fwd, bwd) LSTM output
    proj_b[0], proj_b[1] = -50.0, 50.0
    score = state["text.att_score.weight"]
    score.zero_()
    score[0, :2] = OVERFLOW
    return state


def eos_first_state(global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`global_state` whose report decoder emits EOS as its first token for every input:
    the decoder an attacker who times generation would use as its 'quiet' case."""
    state = {k: v.detach().clone() for k, v in global_state.items()}
    state["decoder.out.weight"][EOS] = 0.0
    state["decoder.out.bias"][EOS] = 1e4
    return state
