"""The report decoder: an LSTM language model that looks at the image while it writes,
conditioned on the fused vector and on the finding, decoded by a constrained beam search
that always takes the same number of steps.

The attention is the spatial attention after the LSTM of Lu et al. 2017 ("Knowing when
to look", without the visual sentinel): the LSTM reads the previous word and the
conditioning, and its state h_t then scores every cell of the image feature map, so each
word is predicted from h_t and the cells it looked at, c_t:

    h_t = LSTM([embed(x_t); fused; finding], h_{t-1})
    a_t = softmax_n((W_h h_t) . (W_v v_n) / sqrt(d)),  c_t = sum_n a_t,n v_n
    p(x_{t+1}) = softmax(out(tanh(W [h_t; c_t])))

Because the attention comes after the recurrence, teacher forcing is one LSTM call over
the whole target followed by batched attention over (B, L, N): every layer with
parameters runs once per forward pass, so the decoder trains unchanged under Opacus'
`GradSampleModule`. The seed decoder read the fused vector alone: its reports were
nearly constant across patients (13 distinct texts for 300 cases) and could contradict
the classifier; here the finding (one-hot of the true class in training, of the
predicted class at generation) sets the initial state and is fed at every step, and the
image is read again at every word.
"""

from __future__ import annotations

import torch
from opacus.layers import DPLSTM
from torch import nn

from shared_model.config import ModelConfig
from shared_model.tokenizer import BOS, EMPTY, EOS, PAD, first_bucket_id

BEAM = 3  # default beam width
NO_REPEAT_NGRAM = 3  # default n-gram size that may not repeat within a report
# The final hypothesis maximises log p / length ** LENGTH_ALPHA (tokens after BOS, EOS
# included): a plain sum of log-probabilities prefers the shortest report.
LENGTH_ALPHA = 1.0
# The search may pass through an OOV bucket (a word outside the lexicon), which
# `strip_oov` then takes out of the report. Barring them from the search instead threw
# the beam off the path it learnt: a hospital whose reports open with a word outside the
# lexicon ("<oov:99> right pleural effusion ...") left the effusion condition no
# likely first word, and the beam went on into another finding's report ("findings there
# is patchy consolidation ..."). On the demo's pooled model, conditioned on its own
# image-only prediction, the reports stated that class on 149 of 153 test films with OOV
# barred (the 4 misses: effusions written as consolidation), on 153 of 153 with OOV
# searched and stripped; the effusion class forced on every test film was stated on
# 6.5% of them barred, 17.6% searched (the decoder also reads the image).

State = tuple[torch.Tensor, torch.Tensor]


def banned_ids(vocab_size: int, device: torch.device) -> torch.Tensor:
    """(V,) True for the ids the search never writes: PAD and BOS (only implied by the
    layout) and EMPTY (means "no report"). The OOV buckets are searched and taken out
    afterwards (`strip_oov`): a hashed unknown word reads "<oov:N>", meaningless to a
    reader, but barring it threw the beam off its path (above)."""
    ban = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,)
    ban[[PAD, BOS, EMPTY]] = True
    return ban


def strip_oov(seq: torch.Tensor, first_oov: int) -> torch.Tensor:
    """`seq` (..., L) with every OOV bucket (ids from `first_oov` on) taken out, the
    tokens after it moved up and PAD at the end: BOS, words, EOS, PAD as before. Tensor
    work of a fixed size (no timing channel)."""
    return _without_oov(seq, first_oov, words_last=False)


def words_right_aligned(seq: torch.Tensor, first_oov: int) -> torch.Tensor:
    """`seq` (R, t) with its OOV buckets taken out and the rest moved to the right, PAD
    on the left: the text as `strip_oov` will show it, laid out so that its last n - 1
    tokens end the row (what `repeated_ngram_bans` reads)."""
    return _without_oov(seq, first_oov, words_last=True)


def _without_oov(seq: torch.Tensor, first_oov: int, *, words_last: bool) -> torch.Tensor:
    """`seq` (..., L) with its OOV buckets replaced by PAD, the kept tokens in their order
    at the start of the row (or at its end, `words_last`): one stable sort by position."""
    keep = seq < first_oov  # (..., L)
    pos = torch.arange(seq.shape[-1], device=seq.device).expand_as(seq)  # (..., L)
    later = ~keep if not words_last else keep  # which tokens sort after the others
    order = torch.where(later, pos + seq.shape[-1], pos).argsort(dim=-1)  # (..., L)
    moved = seq.gather(-1, order)  # (..., L)
    return torch.where(keep.gather(-1, order), moved, torch.full_like(moved, PAD))


def repeated_ngram_bans(seq: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(R, V) True for each token that would complete an n-gram row r of `seq` (R, t)
    already holds: its last n - 1 tokens followed by that token occur earlier in the row.

    Tensor work whose size depends on t alone, never on the tokens (no timing channel).
    """
    r, t = seq.shape
    ban = torch.zeros(r, vocab_size, dtype=torch.bool, device=seq.device)  # (R, V)
    if n < 1 or t < n:
        return ban
    windows = seq.unfold(1, n, 1)  # (R, t-n+1, n) every n-gram of the row
    prefix = seq[:, t - n + 1 :]  # (R, n-1) the row's last n - 1 tokens
    hit = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)  # (R, t-n+1)
    # scatter_add, not scatter: a token can close several windows, hit or not
    count = torch.zeros(r, vocab_size, device=seq.device).scatter_add_(
        1, windows[..., -1], hit.to(torch.float32)
    )  # (R, V)
    return count > 0


def normalised_scores(seq: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(B, beam) each hypothesis' log-probability `score` (B, beam) over its length
    ** `LENGTH_ALPHA` (tokens after BOS in `seq` (B, beam, L), EOS included)."""
    length = (seq[..., 1:] != PAD).sum(-1).clamp_min(1).to(score.dtype)  # (B, beam)
    return score / length**LENGTH_ALPHA  # (B, beam)


def pick_normalised(seq: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """(B, L) the hypothesis of each sample with the best length-normalised score, from
    `seq` (B, beam, L) and their log-probabilities `score` (B, beam)."""
    best = normalised_scores(seq, score).argmax(-1)  # (B,)
    return seq[torch.arange(seq.shape[0], device=seq.device), best]  # (B, L)


def pick_preferred(seq: torch.Tensor, score: torch.Tensor, preferred: torch.Tensor
                   ) -> torch.Tensor:
    """(B, L) of each sample's hypotheses `seq` (B, beam, L) the best length-normalised
    one (`score` (B, beam)) among those `preferred` (B, beam) marks, or among all where
    it marks none: reranking the beam's finished candidates by a constraint the beam
    score cannot see (here: the report states the finding it was conditioned on), the
    beam score breaking ties and deciding the rest."""
    norm = normalised_scores(seq, score)  # (B, beam)
    among = norm.masked_fill(~preferred, float("-inf"))  # (B, beam)
    best = torch.where(preferred.any(-1), among.argmax(-1), norm.argmax(-1))  # (B,)
    return seq[torch.arange(seq.shape[0], device=seq.device), best]  # (B, L)


class ReportDecoder(nn.Module):
    """LSTM language model with spatial attention over the image feature map after the
    recurrence (see the module doc), conditioned on the fused vector and the finding.

    It has its own embedding: sharing the encoder's would run one module twice per
    forward pass, which Opacus' per-sample hooks do not handle reliably. Embeddings of
    PAD positions are zeroed by the mask, not by `padding_idx`, which Opacus' embedding
    grad sampler ignores.
    """

    def __init__(self, cfg: ModelConfig, d_regions: int) -> None:
        super().__init__()
        d_cond = cfg.fused_dim + cfg.num_classes
        hd = cfg.decoder_hidden
        self.hidden = hd
        self.vocab_size = cfg.vocab_size
        # read once: the lexicon file is parsed and checked on every call
        self.first_oov = min(first_bucket_id(), cfg.vocab_size)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.init = nn.Linear(d_cond, 2 * hd)
        self.lstm = DPLSTM(cfg.embed_dim + d_cond, hd, batch_first=True)
        self.att_region = nn.Linear(d_regions, hd)
        self.att_hidden = nn.Linear(hd, hd)
        self.mix = nn.Linear(hd + d_regions, hd)
        self.out = nn.Linear(hd, cfg.vocab_size)

    def initial_state(self, cond: torch.Tensor) -> State:
        """LSTM state from the conditioning (B, F+K): the report starts from the finding."""
        h0, c0 = self.init(cond).split(self.hidden, dim=-1)  # (B, Hd) each
        return torch.tanh(h0).unsqueeze(0), c0.unsqueeze(0).contiguous()  # (1, B, Hd) each

    def attend(
        self, h: torch.Tensor, regions: torch.Tensor, keys: torch.Tensor
    ) -> torch.Tensor:
        """Context (B, L, C): scaled dot-product attention (Luong et al. 2015's "general"
        score) of each h_t (B, L, Hd) over the cells `regions` (B, N, C), whose projections
        `keys` (B, N, Hd) are computed once. Lu et al. score additively, through a
        (B, L, N, Hd) tensor that made the decoder half of a training step (220 ms
        against 117 ms without a decoder, batch 32 on one core); the dot product needs
        none."""
        query = self.att_hidden(h)  # (B, L, Hd)
        energy = torch.einsum("bld,bnd->bln", query, keys) / self.hidden ** 0.5  # (B, L, N)
        weights = energy.softmax(-1)  # (B, L, N)
        return torch.einsum("bln,bnc->blc", weights, regions)  # (B, L, C)

    def step(
        self,
        inputs: torch.Tensor,
        cond: torch.Tensor,
        regions: torch.Tensor,
        keys: torch.Tensor,
        state: State,
    ) -> tuple[torch.Tensor, State]:
        """Next-token logits (B, L, V) for `inputs` (B, L) from `state`; teacher forcing
        is one call with the whole target, generation one call per token."""
        mask = (inputs != PAD).unsqueeze(-1)  # (B, L, 1)
        x = self.embed(inputs) * mask  # (B, L, E)
        c = cond.unsqueeze(1).expand(-1, inputs.shape[1], -1)  # (B, L, F+K)
        h, state = self.lstm(torch.cat((x, c), dim=-1), state)  # (B, L, Hd)
        context = self.attend(h, regions, keys)  # (B, L, C)
        mixed = torch.tanh(self.mix(torch.cat((h, context), dim=-1)))  # (B, L, Hd)
        return self.out(mixed), state  # (B, L, V)

    def forward(
        self,
        fused: torch.Tensor,
        regions: torch.Tensor,
        finding: torch.Tensor,
        inputs: torch.Tensor,
    ) -> torch.Tensor:
        """fused (B, F); regions (B, N, C) image feature map cells; finding (B, K) float
        (one-hot of the true class in training, of the predicted class at generation);
        inputs (B, L) token ids (teacher forcing) -> logits (B, L, V)."""
        cond = torch.cat((fused, finding), dim=-1)  # (B, F+K)
        keys = self.att_region(regions)  # (B, N, Hd)
        logits, _ = self.step(inputs, cond, regions, keys, self.initial_state(cond))
        return logits  # (B, L, V)

    @torch.no_grad()
    def generate(
        self,
        fused: torch.Tensor,
        regions: torch.Tensor,
        finding: torch.Tensor,
        max_len: int,
        beam: int = BEAM,
        no_repeat: int = NO_REPEAT_NGRAM,
    ) -> torch.Tensor:
        """Beam search, (B, max_len) int64: BOS, ids..., EOS, then PAD, like the seed's
        greedy(); a report that reaches max_len without EOS is cut there. The best
        length-normalised hypothesis of `beams` (`pick_normalised`), its OOV buckets
        taken out (`strip_oov`)."""
        return strip_oov(pick_normalised(*self.beams(fused, regions, finding, max_len, beam,
                                                     no_repeat)), self.first_oov)

    @torch.no_grad()
    def beams(
        self,
        fused: torch.Tensor,
        regions: torch.Tensor,
        finding: torch.Tensor,
        max_len: int,
        beam: int = BEAM,
        no_repeat: int = NO_REPEAT_NGRAM,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The beam search's final hypotheses, (B, beam, max_len) int64 laid out as
        `generate`'s rows, and their summed log-probabilities (B, beam); the caller picks
        one per sample (`pick_normalised`, or `pick_preferred` to rerank them).

        Each sample keeps `beam` hypotheses, ranked by their summed log-probability
        while searching; a finished one stays in its slot and is extended by PAD at no
        cost. Never written: PAD, BOS, EMPTY, EOS as the first word, and
        a token that would repeat an n-gram of size `no_repeat` within the hypothesis (0:
        no check; read on the words as shown, OOV buckets left out). beam=1 is greedy
        decoding. Every sample is searched on its own rows, so
        its report does not depend on the rest of the batch.

        Always exactly `max_len - 1` decoder steps, whatever the tokens: no early stop
        once every hypothesis has ended. How long an evaluation takes must not depend on
        the data, or a crafted decoder that ends at once unless a target case is in the
        batch turns the time of a node's reply into a membership bit (a timing side
        channel). A finished hypothesis is fed PAD and its further tokens are PAD, so the
        output is the one an early stop gives.
        """
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: need at least 2 (BOS and one token)")
        if beam < 1:
            raise ValueError(f"beam={beam}: need at least 1")
        b, v, dev = fused.shape[0], self.vocab_size, fused.device
        rows = b * beam
        cond = torch.cat((fused, finding), dim=-1).repeat_interleave(beam, 0)  # (R, F+K)
        keys = self.att_region(regions).repeat_interleave(beam, 0)  # (R, N, Hd)
        regions = regions.repeat_interleave(beam, 0)  # (R, N, C)
        state = self.initial_state(cond)  # (1, R, Hd) each
        seq = torch.full((rows, max_len), PAD, dtype=torch.int64, device=dev)  # (R, L)
        seq[:, 0] = BOS
        # only the first hypothesis is live at the start: the others would duplicate it
        score = torch.full((b, beam), float("-inf"), device=dev)  # (B, beam)
        score[:, 0] = 0.0
        done = torch.zeros(rows, dtype=torch.bool, device=dev)  # (R,)
        ban = banned_ids(v, dev)  # (V,)
        ban_first = ban.clone()  # (V,)
        ban_first[EOS] = True
        pad_only = torch.full((v,), float("-inf"), device=dev)  # (V,) a finished row's step
        pad_only[PAD] = 0.0
        base = torch.arange(b, device=dev).unsqueeze(1) * beam  # (B, 1) first row of each
        for t in range(1, max_len):
            logits, state = self.step(seq[:, t - 1 : t], cond, regions, keys, state)  # (R, 1, V)
            logits = logits[:, -1].masked_fill(ban_first if t == 1 else ban, float("-inf"))
            if no_repeat > 0:
                # on the words as shown: an OOV between them is taken out afterwards
                shown = words_right_aligned(seq[:, :t], self.first_oov)  # (R, t)
                repeats = repeated_ngram_bans(shown, no_repeat, v)  # (R, V)
                logits = logits.masked_fill(repeats, float("-inf"))  # (R, V)
            logits = torch.where(done.unsqueeze(1), pad_only, logits)  # (R, V)
            total = score.view(rows, 1) + logits.log_softmax(-1)  # (R, V)
            score, pick = total.view(b, beam * v).topk(beam, dim=-1)  # (B, beam) each
            parent = (base + pick // v).flatten()  # (R,)
            token = (pick % v).flatten()  # (R,)
            seq = seq[parent]  # (R, L)
            seq[:, t] = token
            done = done[parent] | (token == EOS)  # (R,)
            state = (state[0][:, parent], state[1][:, parent])  # (1, R, Hd) each
        return seq.view(b, beam, max_len), score  # (B, beam, L), (B, beam)
