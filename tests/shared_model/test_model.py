"""The model: head shapes, Opacus compatibility, report dropout, decoding, training."""

from __future__ import annotations

import itertools

import pytest
import torch
from opacus import GradSampleModule
from opacus.layers import DPLSTM
from opacus.validators import ModuleValidator
from torch import nn

from shared_model.batch import Batch
from shared_model.config import ModelConfig
from shared_model.losses import multitask_loss
from shared_model.model import MedFuseModel, ReportDropout, states_finding
from shared_model.tokenizer import BOS, EMPTY, EOS, PAD, Tokenizer, first_bucket_id
from tests.client.crafted import eos_first_state

B, S, T, G, V = 4, 32, 10, 8, 64
FUSIONS = ("concat", "gated", "bilinear")
MODALITIES = ("fused", "image", "text")
COMBOS = list(itertools.product(FUSIONS, MODALITIES))
# Opacus' hooks on the first layer (whose input needs no gradient): expected, harmless
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cfg(fusion: str = "gated", modality: str = "fused", **kw: object) -> ModelConfig:
    """A tiny model: 32 px, two stages, small vocabulary; no generation for text-only."""
    base: dict[str, object] = dict(
        image_size=S,
        cnn_widths=(8, 16),
        norm_groups=4,
        vocab_size=V,
        embed_dim=16,
        lstm_hidden=16,
        fused_dim=32,
        bilinear_rank=4,
        decoder_hidden=24,
        max_report_tokens=T,
        max_gen_tokens=G,
        fusion=fusion,
        modality=modality,
        generation=modality != "text",
    )
    base.update(kw)
    return ModelConfig.small(**base)


def _batch(b: int = B, seed: int = 0) -> Batch:
    """Reports of different lengths (PAD at the end), half the cases with a box."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, V, (b, T), generator=g)
    gen = torch.randint(4, V, (b, G), generator=g)
    for i in range(b):
        n = 2 + i % (T - 2)
        tokens[i, n:] = PAD
        m = 2 + i % (G - 3)
        gen[i, 0], gen[i, m], gen[i, m + 1 :] = BOS, EOS, PAD
    xy = torch.rand(b, 2, generator=g) * 0.5
    return Batch(
        image=torch.randn(b, 1, S, S, generator=g),
        tokens=tokens,
        gen_tokens=gen,
        label=torch.randint(0, 5, (b,), generator=g),
        has_box=(torch.arange(b) % 2 == 0).float(),
        box=torch.cat((xy, xy + 0.4), dim=-1) * (torch.arange(b) % 2 == 0).float()[:, None],
        describes=torch.ones(b),
    )


def _run(model: nn.Module, batch: Batch, cfg: ModelConfig):
    image = batch.image if cfg.modality != "text" else None
    tokens = batch.tokens if cfg.modality != "image" else None
    return model(image, tokens, batch.gen_tokens if cfg.generation else None)


@pytest.mark.parametrize(("fusion", "modality"), COMBOS)
def test_head_shapes(fusion: str, modality: str) -> None:
    # Prepare
    cfg = _cfg(fusion, modality)
    model = MedFuseModel(cfg).eval()
    batch = _batch()
    # Execute
    out = _run(model, batch, cfg)
    # Assert
    assert out.logits.shape == (B, cfg.num_classes)
    if modality == "text":  # where the lesion is, is the image's to say
        assert out.box is None and out.lesion_logit is None and out.cell_boxes is None
        assert out.gen_logits is None and out.image_attention is None
    else:
        h = S // 2 ** len(cfg.cnn_widths)
        assert out.box is not None and out.box.shape == (B, 4)
        assert out.cell_boxes is not None and out.cell_boxes.shape == (B, h * h, 4)
        for boxes in (out.box, out.cell_boxes.flatten(0, 1)):
            assert ((boxes >= 0) & (boxes <= 1)).all()
            assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert out.lesion_logit is not None and out.lesion_logit.shape == (B,)
        # the case's box and score are its best cell's; the attention is that score's softmax
        best = out.cell_logits.argmax(-1)
        torch.testing.assert_close(out.box, out.cell_boxes[torch.arange(B), best])
        torch.testing.assert_close(out.lesion_logit, out.cell_logits.max(-1).values)
        torch.testing.assert_close(out.image_attention.flatten(1), out.cell_logits.softmax(-1))
        assert out.gen_logits is not None and out.gen_logits.shape == (B, G - 1, V)
        assert out.image_attention is not None and out.image_attention.shape == (B, h, h)
        torch.testing.assert_close(out.image_attention.sum((1, 2)), torch.ones(B))
    if modality == "image":
        assert out.text_attention is None
    else:
        att = out.text_attention
        assert att is not None and att.shape == (B, T)
        torch.testing.assert_close(att.sum(-1), torch.ones(B))
        assert torch.equal(att[batch.tokens == PAD], torch.zeros(int((batch.tokens == PAD).sum())))


def test_heads_switched_off() -> None:
    cfg = _cfg(localisation=False, generation=False)
    model = MedFuseModel(cfg)
    batch = _batch()
    out = model(batch.image, batch.tokens, batch.gen_tokens)
    assert out.box is None and out.lesion_logit is None and out.gen_logits is None
    assert model.locate is None and model.decoder is None


def test_missing_modality_input_is_refused() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="needs the image"):
        MedFuseModel(_cfg(modality="image"))(None, batch.tokens)
    with pytest.raises(ValueError, match="needs the report"):
        MedFuseModel(_cfg())(batch.image, None)


@pytest.mark.parametrize(("fusion", "modality"), COMBOS)
def test_opacus_validator_strict(fusion: str, modality: str) -> None:
    ModuleValidator.validate(MedFuseModel(_cfg(fusion, modality)), strict=True)


@pytest.mark.parametrize(("fusion", "modality"), COMBOS)
def test_every_parameter_gets_per_sample_gradients(fusion: str, modality: str) -> None:
    # Prepare
    cfg = _cfg(fusion, modality)
    model = GradSampleModule(MedFuseModel(cfg))
    batch = _batch()
    # Execute
    loss, _ = multitask_loss(_run(model, batch, cfg), batch, cfg)
    loss.backward()
    # Assert
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for name, p in params:
        gs = getattr(p, "grad_sample", None)
        assert gs is not None, name
        assert gs.shape == (B, *p.shape), name


def test_per_sample_gradients_equal_single_sample_gradients() -> None:
    # Prepare: no dropout, so a sample gives the same forward pass alone or in a batch
    cfg = _cfg("bilinear", dropout=0.0, report_dropout=0.0)
    torch.manual_seed(0)
    plain = MedFuseModel(cfg)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    private = GradSampleModule(MedFuseModel(cfg), loss_reduction="mean")
    private._module.load_state_dict(state)
    batch = _batch(3)
    # Execute
    loss, _ = multitask_loss(_run(private, batch, cfg), batch, cfg)
    loss.backward()
    singles = []
    for i in range(3):
        plain.zero_grad()
        one = Batch(*(t[i : i + 1] for t in batch))
        multitask_loss(_run(plain, one, cfg), one, cfg)[0].backward()
        singles.append({n: p.grad.clone() for n, p in plain.named_parameters()})
    # Assert: sample i's gradient does not depend on the other samples (GroupNorm, the
    # per-sample loss means, the PAD embedding row that padding_idx would have frozen)
    for name, p in private._module.named_parameters():
        for i in range(3):
            torch.testing.assert_close(
                p.grad_sample[i],
                singles[i][name],
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}",
            )
        torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-4, atol=1e-6)


def test_empty_batch_goes_through_forward_and_backward() -> None:
    # Prepare: Opacus' Poisson sampling can draw an empty batch
    cfg = _cfg()
    model = GradSampleModule(MedFuseModel(cfg))
    empty = Batch(*(t[:0] for t in _batch()))
    # Execute
    loss, parts = multitask_loss(_run(model, empty, cfg), empty, cfg)
    loss.backward()
    # Assert
    assert parts["total"] == 0.0
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 0, name


def test_dplstm_equals_nn_lstm_with_the_same_weights() -> None:
    # Prepare
    torch.manual_seed(0)
    reference = nn.LSTM(6, 5, batch_first=True, bidirectional=True)
    dp = DPLSTM(6, 5, batch_first=True, bidirectional=True)
    dp.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 6)
    h0, c0 = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    # Execute
    want, (want_h, want_c) = reference(x, (h0, c0))
    got, (got_h, got_c) = dp(x, (h0, c0))
    # Assert
    assert set(dp.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_h, want_h)
    torch.testing.assert_close(got_c, want_c)


def test_state_dict_round_trip() -> None:
    # the server and the sites exchange full state dicts and load them strictly
    cfg = _cfg()
    a, b = MedFuseModel(cfg), MedFuseModel(cfg)
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert "text.lstm.weight_ih_l0_reverse" in a.state_dict()


def test_report_dropout_only_in_training() -> None:
    # Prepare
    tokens = _batch().tokens
    drop = ReportDropout(1.0)
    # Execute
    hidden = drop.train()(tokens)
    kept = drop.eval()(tokens)
    # Assert
    assert torch.equal(kept, tokens)
    assert torch.equal(hidden[:, 0], torch.full((B,), EMPTY))
    assert torch.equal(hidden[:, 1:], torch.full((B, T - 1), PAD))


def test_report_dropout_is_per_sample() -> None:
    torch.manual_seed(0)
    tokens = _batch(64).tokens
    out = ReportDropout(0.5).train()(tokens)
    hidden = (out[:, 0] == EMPTY) & (out[:, 1:] == PAD).all(-1)
    unchanged = (out == tokens).all(-1)
    assert (hidden | unchanged).all()
    assert 0 < int(hidden.sum()) < 64


def test_model_hides_the_report_in_training_mode_only() -> None:
    # with report_dropout=1 the text attention falls entirely on the EMPTY token
    cfg = _cfg(report_dropout=1.0)
    model = MedFuseModel(cfg)
    batch = _batch()
    trained = model.train()(batch.image, batch.tokens).text_attention
    evaluated = model.eval()(batch.image, batch.tokens).text_attention
    assert torch.equal(trained[:, 0], torch.ones(B))
    assert (evaluated[:, 1] > 0).all()  # every report here has at least two tokens


def test_text_only_model_never_hides_the_report() -> None:
    model = MedFuseModel(_cfg(modality="text", report_dropout=1.0)).train()
    att = model(None, _batch().tokens).text_attention
    assert (att[:, 1] > 0).all()


def _layout_ok(seq: torch.Tensor) -> None:
    """BOS, tokens that are neither PAD nor BOS, then EOS followed only by PAD."""
    assert seq.dtype == torch.int64
    assert ((seq >= 0) & (seq < V)).all()
    assert (seq[:, 0] == BOS).all()
    for row in seq.tolist():
        body = row[1:]
        end = body.index(EOS) if EOS in body else len(body)
        assert all(t not in (PAD, BOS, EOS) for t in body[:end]), row
        assert all(t == PAD for t in body[end + 1 :]), row


def test_generate_layout_and_mode() -> None:
    # Prepare
    torch.manual_seed(0)
    cfg = _cfg()
    model = MedFuseModel(cfg).train()
    batch = _batch()
    # Execute
    seq = model.generate(batch.image, batch.tokens)
    short = model.generate(batch.image, batch.tokens, max_len=3)
    # Assert
    assert seq.shape == (B, G) and short.shape == (B, 3)
    _layout_ok(seq)
    _layout_ok(short)
    assert model.training  # the mode it was in
    assert not seq.requires_grad


def test_generate_stops_at_eos_and_pads() -> None:
    # Prepare: a decoder that always prefers EOS, and one that never emits it
    cfg = _cfg(modality="image")
    model = MedFuseModel(cfg)
    batch = _batch()
    with torch.no_grad():
        model.decoder.out.bias[EOS] = 1e4
    # Execute
    stop = model.generate(batch.image, None, max_len=6)
    with torch.no_grad():
        model.decoder.out.bias[EOS] = -1e4
    run_on = model.generate(batch.image, None, max_len=6)
    # Assert: EOS is barred as the first word (an empty report describes nothing), so the
    # EOS-loving decoder writes one word and stops
    _layout_ok(stop)
    assert (stop[:, 2] == EOS).all() and (stop[:, 3:] == PAD).all()
    _layout_ok(run_on)
    assert not (run_on == EOS).any() and not (run_on == PAD).any()


def test_generation_runs_every_step_however_early_the_rows_end() -> None:
    # Prepare: a crafted decoder that ends every description as soon as it may (the quick
    # case of a timing attack), its step calls counted
    torch.manual_seed(0)
    model = MedFuseModel(_cfg(modality="image"))
    model.load_state_dict(eos_first_state(model.state_dict()))
    batch = _batch()
    calls: list[int] = []
    step = model.decoder.step

    def counted(*args: object, **kwargs: object) -> tuple:
        calls.append(1)
        return step(*args, **kwargs)

    model.decoder.step = counted  # type: ignore[method-assign]
    # Execute
    out = model.generate(batch.image, None, max_len=6)
    # Assert: one decoder step per position after BOS, as for a row that never ends;
    # the output is still cut at EOS
    assert len(calls) == 5
    assert (out[:, 2] == EOS).all() and (out[:, 3:] == PAD).all()


def _predicting(cls: int) -> tuple[MedFuseModel, dict[str, torch.Tensor]]:
    """A model whose classifier predicts `cls` for every case, and what its decoder's
    beam search is given (`finding`, `regions`), captured at each call."""
    model = MedFuseModel(_cfg())
    with torch.no_grad():
        model.classifier.bias[cls] = 1e3
    seen: dict[str, torch.Tensor] = {}
    beams = model.decoder.beams

    def capture(fused, regions, finding, *args, **kwargs):
        seen["finding"], seen["regions"] = finding, regions
        return beams(fused, regions, finding, *args, **kwargs)

    model.decoder.beams = capture  # type: ignore[method-assign]
    return model, seen


def test_generation_is_conditioned_on_the_predicted_class() -> None:
    # Prepare: a classifier made to predict class 3 for every case; the decoder's inputs
    # captured
    model, seen = _predicting(3)
    batch = _batch()
    # Execute
    model.generate(batch.image, batch.tokens)
    # Assert: the one-hot of the predicted class, and every cell of the feature map
    want = torch.zeros(B, model.cfg.num_classes)
    want[:, 3] = 1
    assert torch.equal(seen["finding"], want)
    h = S // 2 ** len(model.cfg.cnn_widths)
    assert seen["regions"].shape == (B, h * h, model.cfg.cnn_widths[-1])


def test_generation_states_the_class_it_is_given() -> None:
    # Prepare: a classifier made to predict class 3 from the image alone (the report
    # hidden), while the class shown beside the report, read with the report, differs
    # per case; the decoder's finding captured
    model, seen = _predicting(3)
    batch = _batch()
    shown = torch.tensor([1, 0, 3, 4])
    # Execute
    given = model.generate(batch.image, batch.tokens, classes=shown)
    finding_given = seen["finding"]
    default = model.generate(batch.image, batch.tokens)
    # Assert: the one-hot of the classes given, not of the model's own prediction; the
    # same layout, and without classes the prediction as before
    assert torch.equal(finding_given, torch.eye(model.cfg.num_classes)[shown])
    assert torch.equal(seen["finding"].argmax(-1), torch.full((B,), 3))
    assert given.shape == default.shape == (B, G)
    _layout_ok(given)


def test_loss_falls_on_a_fixed_batch() -> None:
    # Prepare
    torch.manual_seed(0)
    cfg = _cfg(dropout=0.0, report_dropout=0.0)
    model = MedFuseModel(cfg).train()
    batch = _batch(seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Execute
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss, _ = multitask_loss(model(batch.image, batch.tokens, batch.gen_tokens), batch, cfg)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    # Assert
    assert losses[-1] < 0.5 * losses[0]


def test_the_state_holds_each_tensor_once_and_older_files_still_load() -> None:
    # Prepare: DPLSTM registers each LSTM weight under two names
    torch.manual_seed(0)
    model = MedFuseModel(ModelConfig.small(image_size=32))
    params = dict(model.named_parameters())  # one name per tensor
    # Execute
    state = model.state_dict()
    wrapped = GradSampleModule(model).state_dict()  # Opacus' wrapper: the same, prefixed
    # Assert: every tensor once (what is saved and sent), all of them there
    assert len({t.data_ptr() for t in state.values()}) == len(state)
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in params.values())
    assert set(wrapped) == {f"_module.{k}" for k in state}
    # a state with both names (files written before) loads strictly, into the same weights
    full = {**state, **{alias: state[name] for alias, name in model._aliases.items()}}
    assert len(full) == len(state) + 12
    other = MedFuseModel(ModelConfig.small(image_size=32))
    other.load_state_dict(full, strict=True)
    other.load_state_dict(state, strict=True)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ reranking by the finding

NAMES = ("normal", "pneumonia", "nodule", "effusion", "cardiomegaly")


def _candidates(tok: Tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """(len(texts), length) rows BOS, ids, EOS, PAD... of `texts`."""
    return torch.stack([tok.encode_target(t, length) for t in texts])


def test_states_finding_reads_each_candidate_against_its_samples_class() -> None:
    # Prepare: two samples (effusion, normal), three candidates each
    tok = Tokenizer(first_bucket_id() + 64)
    texts = ["small right pleural effusion", "no pleural effusion", "heart size is normal"]
    seq = torch.stack([_candidates(tok, texts, 8)] * 2)  # (2, 3, 8)
    # Execute
    states = states_finding(seq, torch.tensor([3, 0]), NAMES, tok)
    # Assert: a negated effusion reads "normal"
    assert states.tolist() == [[True, False, False], [False, True, True]]


RERANK_TEXTS = ["limited study", "small right pleural effusion", "no acute disease"]


def _rerank_model(predicted: int) -> tuple[MedFuseModel, Tokenizer]:
    """A model whose classifier predicts class `predicted` and whose beam search always
    ends with RERANK_TEXTS, likeliest first: no finding, an effusion, no disease."""
    vocab = first_bucket_id() + 64
    model = MedFuseModel(_cfg(vocab_size=vocab, max_gen_tokens=8))
    tok = Tokenizer(vocab)
    with torch.no_grad():
        model.classifier.bias[predicted] = 1e3
    cands = torch.stack([_candidates(tok, RERANK_TEXTS, 8)] * 2)  # (2, 3, 8)
    score = torch.tensor([[-1.0, -4.0, -2.0]] * 2)  # (2, 3)
    model.decoder.beams = lambda *a, **k: (cands, score)  # type: ignore[method-assign]
    return model, tok


def test_generate_prefers_the_candidate_that_states_the_predicted_finding() -> None:
    # Prepare: a classifier made to predict effusion; a search whose likeliest candidate
    # states no finding and whose second states an effusion
    model, tok = _rerank_model(predicted=3)
    batch, texts = _batch(b=2), RERANK_TEXTS
    # Execute
    reranked = model.generate(batch.image, batch.tokens, label_names=NAMES)
    plain = model.generate(batch.image, batch.tokens)
    # Assert: with the class names the effusion report; without, the beam's best
    assert all(tok.decode(r.tolist()) == texts[1].split() for r in reranked)
    assert all(tok.decode(r.tolist()) == texts[0].split() for r in plain)
    # a class with no stating candidate keeps the beam's best
    with torch.no_grad():
        model.classifier.bias[3], model.classifier.bias[2] = 0.0, 1e3  # nodule
    assert all(tok.decode(r.tolist()) == texts[0].split()
               for r in model.generate(batch.image, batch.tokens, label_names=NAMES))


def test_reranking_reads_candidates_against_the_class_given() -> None:
    # Prepare: the model predicts nodule; the class given is effusion; the likeliest
    # candidate states no finding, the second an effusion
    model, tok = _rerank_model(predicted=2)
    batch, texts = _batch(b=2), RERANK_TEXTS
    # Execute
    out = model.generate(batch.image, batch.tokens, label_names=NAMES,
                         classes=torch.tensor([3, 3]))
    # Assert: the effusion candidate, as the given class asks
    assert all(tok.decode(r.tolist()) == texts[1].split() for r in out)
