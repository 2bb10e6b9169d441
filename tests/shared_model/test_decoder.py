"""The attending report decoder: shapes, per-sample gradients under Opacus, the beam
search's constraints, batch independence, a fixed number of steps, and that it learns to
write the report its finding and image call for."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from shared_model.config import ModelConfig
from shared_model.decoder import (
    BEAM,
    NO_REPEAT_NGRAM,
    ReportDecoder,
    pick_normalised,
    pick_preferred,
    repeated_ngram_bans,
    strip_oov,
)
from shared_model.losses import token_loss
from shared_model.tokenizer import BOS, EMPTY, EOS, PAD, first_bucket_id

# A vocabulary just above the lexicon, so that some ids are OOV buckets
V = first_bucket_id() + 16
OOV = first_bucket_id()
B, F, K, N, C, L = 4, 12, 5, 9, 6, 10
# Opacus' hooks on the first layer (whose input needs no gradient): expected, harmless
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


def _cfg(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=V, embed_dim=8, fused_dim=F, decoder_hidden=16,
                                   num_classes=K, max_gen_tokens=L)
    base.update(kw)
    return ModelConfig.small(**base)


def _decoder(seed: int = 0, **kw: object) -> ReportDecoder:
    torch.manual_seed(seed)
    return ReportDecoder(_cfg(**kw), C).eval()


def _conditions(b: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused (b, F), regions (b, N, C), finding (b, K) one-hot."""
    g = torch.Generator().manual_seed(seed)
    finding = torch.eye(K)[torch.randint(0, K, (b,), generator=g)]
    return torch.randn(b, F, generator=g), torch.randn(b, N, C, generator=g), finding


def _targets(b: int = B, seed: int = 2) -> torch.Tensor:
    """(b, L) BOS, lexicon ids, EOS, PAD...: reports of different lengths."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(5, OOV, (b, L), generator=g)
    for i in range(b):
        m = 2 + i % (L - 3)
        out[i, 0], out[i, m], out[i, m + 1:] = BOS, EOS, PAD
    return out


def _words(row: torch.Tensor) -> list[int]:
    """The ids between BOS and the first EOS (or the PAD that ends a report cut at
    max_len whose OOV buckets were taken out); checks the layout BOS, ids, EOS, PAD..."""
    ids = row.tolist()
    assert ids[0] == BOS
    end = ids.index(EOS) if EOS in ids else len(ids)
    if PAD in ids[:end]:
        end = ids.index(PAD)
        assert EOS not in ids, ids
    assert all(i == PAD for i in ids[end + 1:]), ids
    return ids[1:end]


def _assert_clean(out: torch.Tensor, n: int) -> None:
    for row in out:
        words = _words(row)
        assert words, "EOS as the first word"
        assert not {PAD, BOS, EMPTY, EOS} & set(words), words
        assert all(i < OOV for i in words), words
        grams = [tuple(words[j:j + n]) for j in range(len(words) - n + 1)]
        assert len(grams) == len(set(grams)), words


def test_forward_shape() -> None:
    fused, regions, finding = _conditions()
    logits = _decoder()(fused, regions, finding, _targets()[:, :-1])
    assert logits.shape == (B, L - 1, V)


def test_generate_shape_and_layout() -> None:
    out = _decoder().generate(*_conditions(), max_len=L)
    assert out.shape == (B, L) and out.dtype == torch.int64
    _assert_clean(out, NO_REPEAT_NGRAM)


def test_opacus_validator_strict() -> None:
    ModuleValidator.validate(_decoder().train(), strict=True)


def test_per_sample_gradients_equal_single_sample_gradients() -> None:
    # Prepare
    plain = _decoder().train()
    private = GradSampleModule(_decoder().train(), loss_reduction="mean")
    fused, regions, finding = _conditions()
    regions.requires_grad_(True)  # in the model the feature map is trained through this
    target = _targets()
    # Execute
    token_loss(private(fused, regions, finding, target[:, :-1]), target).backward()
    singles = []
    for i in range(B):
        plain.zero_grad()
        one = slice(i, i + 1)
        token_loss(plain(fused[one], regions[one], finding[one], target[one, :-1]),
                   target[one]).backward()
        singles.append({n: p.grad.clone() for n, p in plain.named_parameters()})
    # Assert: every parameter's per-sample gradient is that sample's gradient alone
    for name, p in private._module.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape == (B, *p.shape), name
        for i in range(B):
            torch.testing.assert_close(p.grad_sample[i], singles[i][name], rtol=1e-4,
                                       atol=1e-5, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")


def _greedy_reference(dec: ReportDecoder, fused, regions, finding, max_len: int,
                      n: int) -> torch.Tensor:
    """Greedy decoding the plain way: re-run the teacher-forced forward on the whole
    prefix for each token, constraints applied row by row in Python."""
    b = fused.shape[0]
    out = torch.full((b, max_len), PAD, dtype=torch.int64)
    out[:, 0] = BOS
    done = [False] * b
    with torch.no_grad():
        for t in range(1, max_len):
            logits = dec(fused, regions, finding, out[:, :t])[:, -1]  # (b, V)
            for i in range(b):
                if done[i]:
                    continue
                row = logits[i].clone()
                row[[PAD, BOS, EMPTY]] = float("-inf")
                if t == 1:
                    row[EOS] = float("-inf")
                seq = [x for x in out[i, :t].tolist() if x < OOV]
                for j in range(len(seq) - n + 1):
                    if n > 1 and seq[j:j + n - 1] == seq[len(seq) - n + 1:] or n == 1:
                        row[seq[j + n - 1]] = float("-inf")
                out[i, t] = int(row.argmax())
                done[i] = out[i, t].item() == EOS
    return strip_oov(out, OOV)


@pytest.mark.parametrize("n", [2, 3])
def test_beam_one_is_greedy(n: int) -> None:
    dec = _decoder(seed=3)
    cond = _conditions(6, seed=4)
    got = dec.generate(*cond, max_len=L, beam=1, no_repeat=n)
    assert torch.equal(got, _greedy_reference(dec, *cond, L, n))


def _hacked(token: int, seed: int = 5) -> ReportDecoder:
    """A random decoder whose output bias makes `token` by far the likeliest next id."""
    dec = _decoder(seed)
    with torch.no_grad():
        dec.out.bias[token] = 100.0
    return dec


@pytest.mark.parametrize("beam", [1, BEAM])
@pytest.mark.parametrize("token", [PAD, BOS, EMPTY, OOV, V - 1, 77, EOS])
def test_constraints_hold_whatever_the_model_prefers(beam: int, token: int) -> None:
    # Prepare: 77 is a lexicon word, repeated forever unless the n-gram check stops it
    dec = _hacked(token)
    # Execute
    out = dec.generate(*_conditions(8), max_len=16, beam=beam)
    # Assert
    if token >= OOV:
        # a decoder that writes nothing but out-of-lexicon words: searched, then taken
        # out, so its report may be left empty, never shown an OOV
        assert all(i < OOV for row in out for i in _words(row))
        return
    _assert_clean(out, NO_REPEAT_NGRAM)
    if token == EOS:  # the report ends as soon as it may
        assert (out[:, 2] == EOS).all()


def test_strip_oov_takes_the_buckets_out_and_keeps_the_layout() -> None:
    # Prepare: hand-made rows: an OOV first word, two OOVs inside, one cut at max_len
    # (no EOS) ending on an OOV, one with none
    w1, w2, w3 = 7, 8, 9
    seq = torch.tensor([
        [BOS, OOV, w1, w2, EOS, PAD, PAD],
        [BOS, w1, OOV, V - 1, w2, EOS, PAD],
        [BOS, w1, w2, w3, w1, w2, OOV],
        [BOS, w3, EOS, PAD, PAD, PAD, PAD],
    ])
    # Execute
    out = strip_oov(seq, OOV)
    # Assert: the same shape, the words in order, PAD after; (beam, L) rows too
    assert out.tolist() == [
        [BOS, w1, w2, EOS, PAD, PAD, PAD],
        [BOS, w1, w2, EOS, PAD, PAD, PAD],
        [BOS, w1, w2, w3, w1, w2, PAD],
        [BOS, w3, EOS, PAD, PAD, PAD, PAD],
    ]
    assert torch.equal(strip_oov(seq.view(2, 2, 7), OOV), out.view(2, 2, 7))


def test_an_oov_first_word_does_not_throw_the_search_off_its_report() -> None:
    # Prepare: a decoder whose likeliest first word is an OOV bucket and whose
    # likeliest word after it is the lexicon word 77, then EOS (what a hospital whose
    # reports open with an out-of-lexicon word teaches); with OOV barred from the
    # search the first word would be another
    dec = _decoder(seed=6)
    with torch.no_grad():
        dec.out.weight.zero_()
        dec.out.bias.zero_()
        dec.out.bias[OOV] = 50.0
        dec.embed.weight[OOV] = 0.0
    step = dec.step

    def scripted(inputs, cond, regions, keys, state):
        logits, state = step(inputs, cond, regions, keys, state)  # (R, 1, V)
        last = inputs[:, -1]  # (R,)
        logits = logits.clone()
        logits[last == OOV, -1, 77] = 100.0
        logits[last == 77, -1, EOS] = 100.0
        return logits, state

    dec.step = scripted  # type: ignore[method-assign]
    # Execute
    out = dec.generate(*_conditions(2), max_len=6, beam=BEAM)
    # Assert: the report the path through the OOV leads to, the OOV taken out
    for row in out:
        assert _words(row) == [77]


def test_constraints_hold_for_an_untrained_decoder() -> None:
    for seed in range(3):
        out = _decoder(seed).generate(*_conditions(16, seed=seed), max_len=20, beam=BEAM)
        _assert_clean(out, NO_REPEAT_NGRAM)


def test_unigram_blocking_never_repeats_a_word() -> None:
    out = _hacked(77).generate(*_conditions(), max_len=12, beam=BEAM, no_repeat=1)
    for row in out:
        words = _words(row)
        assert len(words) == len(set(words))


def test_repeated_ngram_bans() -> None:
    seq = torch.tensor([[BOS, 7, 8, 9, 7, 8], [BOS, 7, 8, 9, 10, 11]])
    bans = repeated_ngram_bans(seq, 3, 16)
    assert bans[0].nonzero().flatten().tolist() == [9]  # 7 8 9 would repeat
    assert not bans[1].any()
    assert repeated_ngram_bans(seq, 1, 16)[1].nonzero().flatten().tolist() == [BOS, 7, 8, 9, 10, 11]


def test_reranking_prefers_a_marked_candidate_the_beam_score_deciding_the_rest() -> None:
    # Prepare: two samples of three candidates, each 3 tokens long (same length, so the
    # normalised order is the score order)
    rows = [[BOS, 7 + k, 8, EOS, PAD] for k in range(3)]
    seq = torch.tensor([rows, rows])  # (2, 3, 5)
    score = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0]])
    # sample 0: candidates 1 and 2 marked (the best of them, 1, wins over the unmarked
    # best 0); sample 1: none marked (the beam's best, 0)
    preferred = torch.tensor([[False, True, True], [False, False, False]])
    # Execute
    out = pick_preferred(seq, score, preferred)
    # Assert
    assert out[0].tolist() == rows[1]
    assert out[1].tolist() == rows[0]
    assert torch.equal(pick_preferred(seq, score, torch.ones(2, 3, dtype=torch.bool)),
                       pick_normalised(seq, score))


def test_the_search_returns_every_candidate_and_generate_the_best_of_them() -> None:
    dec = _decoder(seed=3)
    cond = _conditions(5, seed=4)
    seq, score = dec.beams(*cond, max_len=L, beam=BEAM)
    assert seq.shape == (5, BEAM, L) and score.shape == (5, BEAM)
    _assert_clean(seq.flatten(0, 1), NO_REPEAT_NGRAM)
    assert torch.equal(dec.generate(*cond, max_len=L, beam=BEAM), pick_normalised(seq, score))


def test_the_final_choice_is_length_normalised() -> None:
    # a short report with the higher sum of log-probabilities but the lower mean loses
    short = [BOS, 7, EOS, PAD, PAD, PAD]
    long = [BOS, 7, 8, 9, 10, EOS]
    cut = [BOS, 7, 8, 9, 10, 11]  # reached max_len without EOS: 5 tokens
    seq = torch.tensor([[short, long, cut]])
    assert pick_normalised(seq, torch.tensor([[-2.0, -3.0, -6.0]]))[0].tolist() == long
    assert pick_normalised(seq, torch.tensor([[-2.0, -6.0, -4.0]]))[0].tolist() == cut
    assert pick_normalised(seq, torch.tensor([[-1.0, -6.0, -6.0]]))[0].tolist() == short


def test_output_does_not_depend_on_the_batch() -> None:
    # Prepare
    dec = _decoder(seed=6)
    fused, regions, finding = _conditions(12, seed=7)
    # Execute
    whole = dec.generate(fused, regions, finding, max_len=L)
    alone = torch.cat([dec.generate(fused[i:i + 1], regions[i:i + 1], finding[i:i + 1],
                                    max_len=L) for i in range(12)])
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    shuffled = dec.generate(fused[order], regions[order], finding[order], max_len=L)
    # Assert
    assert torch.equal(whole, alone)
    assert torch.equal(shuffled, whole[order])


@pytest.mark.parametrize("token", [None, EOS, 77])
@pytest.mark.parametrize("beam", [1, BEAM])
def test_always_max_len_minus_one_steps(token: int | None, beam: int) -> None:
    # Prepare: ending at once (EOS), running to the end (77), or whatever a random model does
    dec = _decoder(seed=8) if token is None else _hacked(token, seed=8)
    calls = []
    dec.lstm.register_forward_hook(lambda *_: calls.append(1))
    # Execute
    out = dec.generate(*_conditions(), max_len=L, beam=beam)
    # Assert
    assert len(calls) == L - 1
    if token == EOS:
        assert (out[:, 3:] == PAD).all()


def test_generate_refuses_bad_arguments() -> None:
    dec = _decoder()
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(*_conditions(), max_len=1)
    with pytest.raises(ValueError, match="beam"):
        dec.generate(*_conditions(), max_len=L, beam=0)


def test_learns_the_report_its_finding_and_image_call_for() -> None:
    # Prepare: 5 findings x 2 variants, 10 different reports. The fused vector is noise;
    # the variant is only in the image: one cell, at a random place, carries a mark in
    # channel 0 (variant 0) or 1 (variant 1). So writing the right report needs the
    # finding and the attention over the cells.
    torch.manual_seed(0)
    dec = ReportDecoder(_cfg(embed_dim=16, decoder_hidden=32), C)
    reports = torch.full((2 * K, 8), PAD, dtype=torch.int64)
    for k in range(K):
        for var in range(2):
            words = [10 + k, 20 + var, 30 + 3 * k + var] + ([40 + k] if var else [])
            reports[2 * k + var, : len(words) + 2] = torch.tensor([BOS, *words, EOS])

    def draw(n: int, g: torch.Generator):
        case = torch.arange(n) % (2 * K)
        k, var = case // 2, case % 2
        regions = 0.1 * torch.randn(n, N, C, generator=g)
        cell = torch.randint(0, N, (n,), generator=g)
        regions[torch.arange(n), cell, var] = 3.0
        return torch.randn(n, F, generator=g), regions, torch.eye(K)[k], reports[case]

    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    # Execute
    for _ in range(500):  # 300 is enough for most seeds, 500 for all 8 tried
        fused, regions, finding, target = draw(40, g)
        opt.zero_grad()
        token_loss(dec(fused, regions, finding, target[:, :-1]), target).backward()
        opt.step()
    fused, regions, finding, target = draw(20, g)
    out = dec.eval().generate(fused, regions, finding, max_len=8)
    # Assert
    assert torch.equal(out, target)
