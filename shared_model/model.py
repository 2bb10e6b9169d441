"""The multimodal model (after arXiv 2405.17459): a CNN reads the image, a BiLSTM with
additive attention reads the report, a fusion layer joins them, and three heads classify
the disease, locate the lesion and write a description.

Every trainable layer is one Opacus can compute per-sample gradients for (Conv2d,
GroupNorm, Linear, Embedding, and DPLSTM's RNNLinear), and every layer with parameters
runs once per forward pass, so the model trains unchanged under `GradSampleModule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from opacus.layers import DPLSTM
from torch import nn

from shared_model.config import ModelConfig, TrainLayers
from shared_model.decoder import (
    BEAM,
    ReportDecoder,
    pick_normalised,
    pick_preferred,
    strip_oov,
)
from shared_model.report_labeller import read_finding
from shared_model.tokenizer import EMPTY, PAD, Tokenizer

NormLayer = Callable[[int], nn.Module]

# Bumped when the layers change under the same ModelConfig: a cached public model or a
# model file of another architecture is then not reused. 2: the grid box head, the
# attention supervised by the lesion, the decoder that attends over the image (3: its
# attention by dot product).
ARCHITECTURE = 3


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, K) class scores
    box: torch.Tensor | None  # (B, 4) x0, y0, x1, y1 fractions: the best-scoring cell's box
    lesion_logit: torch.Tensor | None  # (B,) score that the case has a lesion: max cell score
    gen_logits: torch.Tensor | None  # (B, G-1, V) next-token scores for gen_tokens[:, 1:]
    text_attention: torch.Tensor | None  # (B, T) weights over report tokens, 0 on PAD
    image_attention: torch.Tensor | None  # (B, h, w) weights over feature-map positions
    image_logits: torch.Tensor | None = None  # (B, K) auxiliary image-only class scores
    cell_boxes: torch.Tensor | None = None  # (B, h*w, 4) each cell's box (the box loss)
    cell_logits: torch.Tensor | None = None  # (B, h*w) each cell's lesion score (its loss)


class ImageFeatures(NamedTuple):
    vector: torch.Tensor  # (B, 2C) attention-pooled and average-pooled features
    attended: torch.Tensor  # (B, C) attention-pooled features alone
    attention: torch.Tensor  # (B, h, w) softmax of `cell_logits`: where the model looks
    fmap: torch.Tensor  # (B, C, h, w) the feature map the heads read for where
    cell_logits: torch.Tensor  # (B, h*w) per-cell lesion score (logit), row-major


# ---------------------------------------------------------------------------- image


class ResidualBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm plus a skip (projected when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), norm_layer(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))  # (B, C', H/s, W/s)
        y = self.norm2(self.conv2(y))  # (B, C', H/s, W/s)
        return F.relu(y + self.skip(x))


class ImageEncoder(nn.Module):
    """A small ResNet whose feature map is pooled twice: by a spatial attention and by a
    plain average (the whole image).

    The attention is the softmax of a per-cell lesion score that the localisation loss
    supervises (the cells on the finding score high): so the map the model pools with is
    the map that says where the lesion is, and it can be checked against the true box
    (the pointing game). An unsupervised attention peaked below the heart or at the
    body's lower edge, not on the finding.

    The norm layer is injected (torchvision's `norm_layer`) so that the model can use
    GroupNorm: Opacus cannot compute per-sample gradients through BatchNorm, which mixes
    the samples of a batch.
    """

    def __init__(self, cfg: ModelConfig, norm_layer: NormLayer) -> None:
        super().__init__()
        w0 = cfg.cnn_widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w0, 3, padding=1, bias=False), norm_layer(w0), nn.ReLU()
        )
        stages: list[nn.Module] = []
        c_in = w0
        for width in cfg.cnn_widths:
            blocks = [ResidualBlock(c_in, width, 2, norm_layer)]
            blocks += [
                ResidualBlock(width, width, 1, norm_layer)
                for _ in range(cfg.cnn_blocks_per_stage - 1)
            ]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.score = nn.Conv2d(c_in, 1, 1)
        self.channels = c_in
        self.out_dim = 2 * c_in

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        fmap = self.stages(self.stem(image))  # (B, C, h, w)
        b, c, h, w = fmap.shape
        flat = fmap.flatten(2)  # (B, C, h*w)
        cell_logits = self.score(fmap).flatten(1)  # (B, h*w)
        att = cell_logits.softmax(-1)  # (B, h*w)
        attended = torch.einsum("bcn,bn->bc", flat, att)  # (B, C)
        average = flat.mean(-1)  # (B, C)
        return ImageFeatures(
            vector=torch.cat((attended, average), dim=-1),  # (B, 2C)
            attended=attended,
            attention=att.view(b, h, w),
            fmap=fmap,
            cell_logits=cell_logits,
        )


# ----------------------------------------------------------------------------- text


class ReportDropout(nn.Module):
    """In training, hides each sample's report with probability `p` (the report becomes
    [EMPTY, PAD, ...]), so the model also learns to read the image alone: reports can be
    missing or uninformative, and generation is scored with the report hidden.

    Each sample is decided on its own, so the per-sample gradients stay per sample.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return tokens
        drop = torch.rand(tokens.shape[0], device=tokens.device) < self.p  # (B,)
        hidden = torch.full_like(tokens, PAD)  # (B, T)
        hidden[:, 0] = EMPTY
        return torch.where(drop.unsqueeze(1), hidden, tokens)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TextEncoder(nn.Module):
    """Bidirectional LSTM over the report, pooled by additive attention (Bahdanau) whose
    weights are kept to show which words the model read.

    Opacus' `DPLSTM`, not `nn.LSTM`: the latter gets no per-sample gradients. Embeddings of
    PAD positions are zeroed by the mask rather than relying on `padding_idx`, because
    Opacus' embedding grad sampler ignores `padding_idx` and would otherwise move the PAD
    row under DP while plain training keeps it at zero.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=PAD)
        self.lstm = DPLSTM(cfg.embed_dim, cfg.lstm_hidden, batch_first=True, bidirectional=True)
        self.att_proj = nn.Linear(2 * cfg.lstm_hidden, cfg.lstm_hidden)
        self.att_score = nn.Linear(cfg.lstm_hidden, 1, bias=False)
        self.out_dim = 2 * cfg.lstm_hidden

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD  # (B, T)
        x = self.embed(tokens) * mask.unsqueeze(-1)  # (B, T, E)
        h, _ = self.lstm(x)  # (B, T, 2H)
        scores = self.att_score(torch.tanh(self.att_proj(h))).squeeze(-1)  # (B, T)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(-1)  # (B, T)
        pooled = torch.einsum("btd,bt->bd", h, weights)  # (B, 2H)
        return pooled, weights


# --------------------------------------------------------------------------- fusion


class ConcatFusion(nn.Module):
    """The baseline: concatenate, then one dense layer."""

    def __init__(self, d_image: int, d_text: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_image + d_text, d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(torch.cat((x, y), dim=-1)))  # (B, F)


class GatedFusion(nn.Module):
    """Gated attention: a sigmoid gate, computed from both modalities, decides per feature
    how much comes from the image and how much from the report (a hidden or useless
    report can be gated out)."""

    def __init__(self, d_image: int, d_text: int, d_out: int) -> None:
        super().__init__()
        self.image = nn.Linear(d_image, d_out)
        self.text = nn.Linear(d_text, d_out)
        self.gate = nn.Linear(d_image + d_text, d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hx = torch.tanh(self.image(x))  # (B, F)
        hy = torch.tanh(self.text(y))  # (B, F)
        z = torch.sigmoid(self.gate(torch.cat((x, y), dim=-1)))  # (B, F)
        return z * hx + (1 - z) * hy  # (B, F)


class BilinearFusion(nn.Module):
    """Low-rank bilinear pooling (MFB, Yu et al. 2017): each output feature is a rank-R
    bilinear form x^T W_f y = sum_r (U_r x)(V_r y), so image and text features multiply
    instead of merely adding, at a cost linear in R."""

    def __init__(self, d_image: int, d_text: int, d_out: int, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self.u = nn.Linear(d_image, d_out * rank)
        self.v = nn.Linear(d_text, d_out * rank)
        self.proj = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        joint = self.u(x) * self.v(y)  # (B, F*R)
        joint = joint.view(joint.shape[0], -1, self.rank).sum(-1)  # (B, F)
        return F.relu(self.proj(joint))  # (B, F)


class Projection(nn.Module):
    """Single-modality baselines: the one encoder's vector, projected to the fused size."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(x))  # (B, F)


# ---------------------------------------------------------------------------- heads


def cell_centres(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(h*w, 2) x, y of each feature-map cell's centre as fractions, row-major."""
    ys = (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h
    xs = (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w
    return torch.stack((xs.repeat(h), ys.repeat_interleave(w)), dim=-1)  # (h*w, 2)


class GridLocaliser(nn.Module):
    """A box per feature-map cell, FCOS-style (Tian et al. 2019): each cell regresses the
    distances from its centre to the four sides of the lesion box; the case's box is the
    box of its highest-scoring cell (the encoder's per-cell lesion score), its lesion
    score that cell's score.

    The box head of the seed read the pooled vector, where position had been averaged
    away, and drew nearly one rectangle over the heart on every film (nodule IoU 0.12).

    The distances go through sigmoids scaled to the room on each side of the centre, so
    every box is valid (x0 <= x1, y0 <= y1) and inside [0, 1] without clamping.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(channels, channels, 3, padding=1)
        self.sides = nn.Conv2d(channels, 4, 1)

    def forward(self, fmap: torch.Tensor, cell_logits: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 4) box, (B,) lesion logit, (B, h*w, 4) every cell's box."""
        b, _, h, w = fmap.shape
        raw = self.sides(F.relu(self.hidden(fmap))).flatten(2).transpose(1, 2)  # (B, h*w, 4)
        frac = torch.sigmoid(raw)  # (B, h*w, 4) left, top, right, bottom as shares of room
        centre = cell_centres(h, w, fmap)  # (h*w, 2)
        lo = centre * (1 - frac[..., :2])  # (B, h*w, 2) x0, y0 in [0, centre]
        hi = centre + (1 - centre) * frac[..., 2:]  # (B, h*w, 2) x1, y1 in [centre, 1]
        cell_boxes = torch.cat((lo, hi), dim=-1)  # (B, h*w, 4)
        best = cell_logits.argmax(-1)  # (B,)
        rows = torch.arange(b, device=fmap.device)
        return cell_boxes[rows, best], cell_logits[rows, best], cell_boxes


# ---------------------------------------------------------------------------- model

# Parameters each choice leaves frozen (at the initial model's values), by name prefix.
# The vocabulary-sized matrices (report and decoder embeddings, decoder output) are 61% of
# the small model: under DP every trained coordinate gets noise, so freezing them (learnt on
# public reports) spreads the same noise over fewer coordinates. `heads` trains only the
# fusion and the heads on top of frozen public encoders. `classifier` trains the fusion
# and the two classification heads (67 k of 941 k coordinates): the box head and the
# report decoder keep the public model's weights, and the whole clipping norm goes to
# what decides the label.
FROZEN: dict[str, tuple[str, ...]] = {
    "all": (),
    "no-embeddings": ("text.embed.", "decoder.embed.", "decoder.out."),
    "heads": ("image.", "text.", "decoder.embed.", "decoder.out.", "decoder.lstm."),
    "classifier": ("image.", "text.", "locate.", "decoder."),
}
# Choices that train only the parameters named, everything else frozen. `prior` trains
# the classification head's bias alone (num_classes coordinates): the label mix of the
# hospital the model is adapted to. Under DP the noise falls on those few coordinates, so
# a small reserve of epsilon moves them far, where training the whole head spreads it
# over 67 k.
TRAINED_ONLY: dict[str, tuple[str, ...]] = {"prior": ("classifier.bias",)}


def freeze(model: nn.Module, layers: TrainLayers) -> int:
    """Freeze the parameters `layers` leaves out; return how many coordinates still train."""
    only = TRAINED_ONLY.get(layers)
    prefixes = FROZEN.get(layers, ())
    trained = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in only if only is not None else not name.startswith(prefixes))
        trained += p.numel() if p.requires_grad else 0
    return trained



def _aliased_names(module: nn.Module) -> dict[str, str]:
    """State-dict names that hold a tensor an earlier name already holds -> that name.
    Opacus' DPLSTM registers each LSTM weight twice (`weight_ih_l0` and `l0.ih.weight`):
    12 of the small model's 81 state-dict entries, 16% of its bytes."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _drop_aliases(module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    """state_dict() without the second name of a tensor: what is saved and sent holds each
    weight once."""
    for alias in module._aliases:  # type: ignore[union-attr]
        state.pop(prefix + alias, None)


def _fill_aliases(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    """load_state_dict() accepts a state with or without the second names (older files
    hold both): each alias is loaded from the tensor it stands for."""
    for alias, name in module._aliases.items():  # type: ignore[union-attr]
        if prefix + name in state:
            state[prefix + alias] = state[prefix + name]


class MedFuseModel(nn.Module):
    """Image + report -> disease class, lesion box, description.

    `cfg.modality` 'image' or 'text' builds only that encoder (the single-modality
    baselines); the inputs of the missing modality may then be None.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        norm_layer: NormLayer = partial(nn.GroupNorm, cfg.norm_groups)
        d = cfg.fused_dim
        self.image: ImageEncoder | None = None
        self.text: TextEncoder | None = None
        if cfg.modality != "text":
            self.image = ImageEncoder(cfg, norm_layer)
        if cfg.modality != "image":
            self.text = TextEncoder(cfg)
        # hiding the report only makes sense when there is an image to fall back on
        self.report_dropout = ReportDropout(cfg.report_dropout if cfg.modality == "fused" else 0)
        self.fusion: nn.Module
        if self.image is not None and self.text is not None:
            di, dt = self.image.out_dim, self.text.out_dim
            if cfg.fusion == "concat":
                self.fusion = ConcatFusion(di, dt, d)
            elif cfg.fusion == "gated":
                self.fusion = GatedFusion(di, dt, d)
            else:
                self.fusion = BilinearFusion(di, dt, d, cfg.bilinear_rank)
        elif self.image is not None:
            self.fusion = Projection(self.image.out_dim, d)
        else:
            assert self.text is not None
            self.fusion = Projection(self.text.out_dim, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(d, cfg.num_classes)
        # Fused models otherwise lean on the report (the easier modality) and leave the
        # image encoder under-trained for the cases whose report says nothing; an
        # image-only classifier on the image features keeps that branch learning.
        self.image_classifier: nn.Linear | None = None
        if self.image is not None and self.text is not None and cfg.loss_aux_image > 0:
            self.image_classifier = nn.Linear(self.image.out_dim, cfg.num_classes)
        # Where the lesion is is a property of the image: the box head reads the image's
        # feature map (a text-only model draws no box).
        self.locate: GridLocaliser | None = None
        if cfg.localisation and self.image is not None:
            self.locate = GridLocaliser(self.image.channels)
        self.decoder: ReportDecoder | None = None
        if cfg.generation and self.image is not None:  # it writes what it sees
            self.decoder = ReportDecoder(cfg, self.image.channels)
        self._aliases = _aliased_names(self)
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    def encode(
        self, image: torch.Tensor | None, tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, ImageFeatures | None, torch.Tensor | None]:
        """The fused vector (B, F), the image features and the text attention (B, T)."""
        img = txt = text_att = None
        if self.image is not None:
            if image is None:
                raise ValueError(f"modality={self.cfg.modality!r} needs the image")
            img = self.image(image)
        if self.text is not None:
            if tokens is None:
                raise ValueError(f"modality={self.cfg.modality!r} needs the report tokens")
            txt, text_att = self.text(self.report_dropout(tokens))  # (B, 2H), (B, T)
        if img is not None and txt is not None:
            fused = self.fusion(img.vector, txt)  # (B, F)
        else:
            fused = self.fusion(img.vector if img is not None else txt)  # (B, F)
        return self.drop(fused), img, text_att

    def forward(
        self,
        image: torch.Tensor | None,
        tokens: torch.Tensor | None,
        gen_tokens: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
    ) -> ModelOutput:
        """`label` (B,): the true classes the decoder is conditioned on when it learns
        (teacher forcing of the finding); without it, the predicted classes."""
        fused, img, text_att = self.encode(image, tokens)  # (B, F)
        logits = self.classifier(fused)  # (B, K)
        box = lesion = gen_logits = cell_boxes = None
        if self.locate is not None and img is not None:
            box, lesion, cell_boxes = self.locate(img.fmap, img.cell_logits)  # (B, 4), (B,), ...
        if self.decoder is not None and gen_tokens is not None and img is not None:
            finding = self._finding(logits, label)  # (B, K)
            gen_logits = self.decoder(fused, _regions(img), finding,
                                      gen_tokens[:, :-1])  # (B, G-1, V)
        return ModelOutput(
            logits=logits,
            box=box,
            lesion_logit=lesion,
            gen_logits=gen_logits,
            text_attention=text_att,
            image_attention=img.attention if img is not None else None,
            image_logits=(
                self.image_classifier(img.vector)  # (B, K)
                if self.image_classifier is not None and img is not None
                else None
            ),
            cell_boxes=cell_boxes,
            cell_logits=img.cell_logits if cell_boxes is not None else None,
        )

    @torch.no_grad()
    def generate(
        self, image: torch.Tensor, tokens: torch.Tensor | None, max_len: int | None = None,
        beam: int = BEAM, label_names: Sequence[str] = (),
        classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The description, (B, L) int64 laid out like `Batch.gen_tokens`: BOS, ids...,
        EOS, then PAD; L is `max_len` (default `cfg.max_gen_tokens`), and a row that
        reaches it without EOS is cut there. Conditioned on a class, so the report states
        the finding the classifier gives; beam search with repeated trigrams and special
        tokens barred, OOV buckets searched and then taken out (`decoder.strip_oov`),
        always `max_len - 1` decoder steps however early the rows end (no timing side
        channel: `ReportDecoder.beams`).

        `classes` (B,) int: the class each report is to state, the classifier's answer
        that is shown beside it (`forward(image, report).logits.argmax(-1)`, the report
        read). Without it, the class the model predicts from `image` and `tokens` as
        given; callers hide the report from the decoder (`tokens` EMPTY), so that is the
        image alone, which cannot tell a hazy basal effusion from a pneumonia (the
        synthetic films draw 45% of both as the same opacity): on the demo's pooled
        model it differed from the shown class on 17 of 153 test cases, 10 of them
        effusions written up as consolidation, and the report then contradicted the
        label beside it. Either way the decoder reads only the image (`tokens`) and the
        class, never the report's words.

        With the class names `label_names` (one per class), the beam's final candidates
        are reranked: one that the report labeller reads as the finding it was
        conditioned on is preferred, the beam score deciding among those and where none
        is (`pick_preferred`). The likeliest text may state no finding ("limited study")
        or another one (pneumonia written for an effusion). The reading comes after the
        search's fixed number of steps and reads every candidate, as the metrics read the
        chosen report after it. Without names: the best beam score. Runs in eval mode and
        restores the mode."""
        if self.decoder is None:
            raise RuntimeError("this model was built without a report decoder")
        max_len = self.cfg.max_gen_tokens if max_len is None else max_len
        if max_len < 2:
            raise ValueError(f"max_len={max_len}: need at least 2 (BOS and one token)")
        was_training = self.training
        self.eval()
        try:
            fused, img, _ = self.encode(image, tokens)  # (B, F)
            assert img is not None  # a decoder is built only with an image encoder
            finding = self._finding(self.classifier(fused), classes)  # (B, K)
            seq, score = self.decoder.beams(fused, _regions(img), finding, max_len,
                                            beam=beam)  # (B, beam, L), (B, beam)
            first_oov = self.decoder.first_oov
            if len(label_names) != self.cfg.num_classes:
                return strip_oov(pick_normalised(seq, score), first_oov)  # (B, L)
            states = states_finding(seq, finding.argmax(-1), label_names,
                                    _tokenizer(self.cfg.vocab_size))  # (B, beam)
            return strip_oov(pick_preferred(seq, score, states.to(seq.device)),
                             first_oov)  # (B, L)
        finally:
            self.train(was_training)

    def _finding(self, logits: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """(B, K) one-hot of `label`, or of the predicted class (from `logits`, (B, K))
        where no label is given."""
        cls = label.to(logits.device) if label is not None else logits.detach().argmax(-1)
        return F.one_hot(cls, self.cfg.num_classes).to(self.classifier.weight.dtype)


def states_finding(seq: torch.Tensor, cls: torch.Tensor, label_names: Sequence[str],
                   tokenizer: Tokenizer) -> torch.Tensor:
    """(B, beam) bool: whether the report labeller reads each candidate of `seq`
    (B, beam, L) as its sample's class `cls` (B,), named by `label_names` ("normal":
    no finding stated)."""
    b, beam, _ = seq.shape
    rows = seq.cpu().tolist()
    names = [label_names[int(k)] for k in cls.cpu()]
    return torch.tensor([[read_finding(tokenizer.decode(rows[i][j]), label_names) == names[i]
                          for j in range(beam)] for i in range(b)], dtype=torch.bool)


@lru_cache(maxsize=2)
def _tokenizer(vocab_size: int) -> Tokenizer:
    """One tokenizer per vocabulary size (building one reads the lexicon file)."""
    return Tokenizer(vocab_size)


def _regions(img: ImageFeatures) -> torch.Tensor:
    """(B, h*w, C) the feature map's cells, the decoder's attention reads them."""
    return img.fmap.flatten(2).transpose(1, 2)
