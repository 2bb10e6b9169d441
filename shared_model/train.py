"""The one training loop and the one evaluator, used by pooled, local and federated runs.

DP wraps this loop, it does not fork it: with Opacus the model is a GradSampleModule,
the optimizer a DPOptimizer and the loader a Poisson loader, and `train_epoch` runs
unchanged (Opacus' objects "act just like their non-private counterparts").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shared_model.batch import Batch
from shared_model.config import DEFAULT_LESION_THRESHOLD, ModelConfig
from shared_model.contract.metric_registry import METRICS, exact_per_label
from shared_model.losses import multitask_loss
from shared_model.model import MedFuseModel, ModelOutput
from shared_model.tokenizer import EMPTY, PAD, Tokenizer

LossFn = Callable[[ModelOutput, Batch], tuple[torch.Tensor, dict[str, float]]]


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` takes the GPU when this node has one; `cpu`, `cuda`, `cuda:N` are taken as
    asked, and asking for a GPU that is not there is an error, not a silent CPU run."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={preference!r} asked for, but this node has no CUDA GPU")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and numpy; return a generator for DataLoader shuffling."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def unwrap(model: nn.Module) -> MedFuseModel:
    """The plain model inside an Opacus GradSampleModule (or the model itself)."""
    inner = getattr(model, "_module", model)
    assert isinstance(inner, MedFuseModel), type(inner)
    return inner


def make_loss_fn(cfg: ModelConfig) -> LossFn:
    return lambda out, batch: multitask_loss(out, batch, cfg)


def forward(model: nn.Module, batch: Batch, cfg: ModelConfig) -> ModelOutput:
    """Feed only the modalities the model has, and the decoder target when it generates
    (conditioned on the true finding, as the target is teacher-forced)."""
    image = batch.image if cfg.modality != "text" else None
    tokens = batch.tokens if cfg.modality != "image" else None
    if not cfg.generation:
        return model(image, tokens)
    return model(image, tokens, batch.gen_tokens, batch.label)


@dataclass(frozen=True)
class EpochStats:
    loss: float  # mean loss per training example
    examples: int  # training examples seen (not batches)
    steps: int  # optimizer steps taken


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    loss_fn: LossFn,
    cfg: ModelConfig,
    device: torch.device,
    after_step: Callable[[], None] | None = None,
    views: Callable[[Batch], Batch] | None = None,
) -> EpochStats:
    """One pass over `loader`.

    Empty batches (Poisson sampling can draw none) still go through forward, backward and
    `optimizer.step()`: a DP optimizer then adds its noise and its accountant counts the
    step, exactly as the privacy analysis assumes. `after_step` runs after each step
    (FedProx' proximal pull, which touches no data and so needs no privacy). `views` turns
    each batch into the rows the model trains on (`shared_model.augment.views_of`: k random
    views of each example); `examples` counts the loader's examples, not the views.
    """
    model.train()
    total, examples, steps = 0.0, 0, 0
    for raw in loader:
        batch = Batch.of(raw).to(device)
        size = batch.size
        if views is not None:
            batch = views(batch)
        optimizer.zero_grad(set_to_none=True)
        out = forward(model, batch, cfg)
        loss, _ = loss_fn(out, batch)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        examples += size
        if size:
            total += float(loss.detach()) * size
    return EpochStats(loss=total / max(examples, 1), examples=examples, steps=steps)


def proximal_pull(
    model: nn.Module, anchor: Mapping[str, torch.Tensor], mu: float, lr: float
) -> Callable[[], None]:
    """FedProx' proximal term mu/2 * ||w - w_global||^2 as a decoupled step after each update.

    Under Opacus the per-sample gradients come from module hooks, so a penalty added to
    the loss would be dropped; its gradient mu * (w - w_global) depends on no data, so
    applying it after the private step costs no privacy and matches FedProx for SGD.
    """
    params = [(p, anchor[name]) for name, p in unwrap(model).named_parameters() if p.requires_grad]

    @torch.no_grad()
    def pull() -> None:
        for p, w0 in params:
            p.sub_(lr * mu * (p - w0.to(p.device)))

    return pull


@dataclass(frozen=True)
class CaseResults:
    """What the model did on each case of one split, in case order: everything a metric
    needs, so that the exact summary (`summarise`) and a site's private release
    (`client.release`) read the same numbers."""

    labels: np.ndarray  # (N,) int64 true class
    probs: np.ndarray  # (N, K) float64 class probabilities
    loss_sum: float  # sum over cases of the multitask loss
    boxes: np.ndarray | None  # (N, 4) predicted lesion boxes; None without a box head
    true_boxes: np.ndarray | None  # (N, 4)
    has_box: np.ndarray | None  # (N,) 1.0 for a lesion case
    refs: list[list[str]] | None  # reference report tokens; None without generation
    hyps: list[list[str]] | None  # generated tokens (report hidden)
    lesion_scores: np.ndarray | None = None  # (N,) predicted P(lesion); None without box head
    lesion_threshold: float = DEFAULT_LESION_THRESHOLD  # a box where lesion_scores >= this
    attention_peaks: np.ndarray | None = None  # (N, 2) x, y fractions: the attention's peak
    label_names: tuple[str, ...] = ()  # class index -> name; () where unknown
    # the training split's reference tokens, where the constant-report baseline is
    # chosen; None where the evaluation has no training split to hand (no baseline then)
    train_refs: list[list[str]] | None = None

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def evaluate_cases(
    model: nn.Module,
    dataset: Dataset,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    batch_size: int = 64,
    label_names: tuple[str, ...] = (),
    lesion_threshold: float = DEFAULT_LESION_THRESHOLD,
    generate: bool = True,
    train_refs: Sequence[Sequence[str]] | None = None,
) -> CaseResults:
    """Run the model over one split and keep each case's outputs.

    Generation is scored with the report hidden (the encoder sees only EMPTY): the decoder
    must describe the image, not copy the report it was given; with `label_names` it
    prefers a candidate that states its finding (`MedFuseModel.generate`), as `predict`
    does. `generate=False` skips it (the costly part) where only the scores are wanted,
    as for calibration. `train_refs` (`references_of` the training split) is where the
    constant-report baseline is chosen; without it that baseline is left out.
    """
    net = unwrap(model).to(device)
    net.eval()
    loss_fn = make_loss_fn(cfg)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    loss_sum = 0.0
    labels, probs, boxes, true_boxes, has_box, scores, peaks = [], [], [], [], [], [], []
    refs: list[list[str]] = []
    hyps: list[list[str]] = []
    for raw in loader:
        batch = Batch.of(raw).to(device)
        out = forward(net, batch, cfg)
        loss, _ = loss_fn(out, batch)
        loss_sum += float(loss) * batch.size
        labels.append(batch.label.cpu())
        probs.append(out.logits.softmax(-1).cpu())
        if out.image_attention is not None:
            peaks.append(attention_peak(out.image_attention).cpu())
        if out.box is not None:
            boxes.append(out.box.cpu())
            true_boxes.append(batch.box.cpu())
            has_box.append(batch.has_box.cpu())
            if out.lesion_logit is not None:
                scores.append(out.lesion_logit.sigmoid().cpu())
        if cfg.generation and generate:
            hidden = torch.full_like(batch.tokens, PAD)
            hidden[:, 0] = EMPTY
            # the report states the class the model shows (it read the report): what a
            # reader sees beside it; the decoder itself reads no report word
            generated = net.generate(batch.image, hidden, label_names=label_names,
                                     classes=out.logits.argmax(-1))
            refs += [tokenizer.decode(t.tolist()) for t in batch.gen_tokens.cpu()]
            hyps += [tokenizer.decode(t.tolist()) for t in generated.cpu()]

    def cat(parts: list[torch.Tensor]) -> np.ndarray | None:
        return torch.cat(parts).double().numpy() if parts else None

    return CaseResults(
        labels=torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64),
        probs=cat(probs) if probs else np.zeros((0, cfg.num_classes)),
        loss_sum=loss_sum,
        boxes=cat(boxes), true_boxes=cat(true_boxes), has_box=cat(has_box),
        refs=refs if cfg.generation and generate else None,
        hyps=hyps if cfg.generation and generate else None,
        lesion_scores=cat(scores),
        lesion_threshold=lesion_threshold,
        attention_peaks=cat(peaks),
        label_names=tuple(label_names),
        train_refs=([list(r) for r in train_refs]
                    if train_refs is not None and cfg.generation and generate else None),
    )


def references_of(dataset: Dataset, tokenizer: Tokenizer, batch_size: int = 256
                  ) -> list[list[str]]:
    """The reference report tokens of every case of `dataset` (its decoder targets,
    decoded as the generated reports are), in case order; no model is run. The training
    split's are where the constant-report baseline is chosen."""
    refs: list[list[str]] = []
    for raw in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        refs += [tokenizer.decode(t.tolist()) for t in Batch.of(raw).gen_tokens]
    return refs


def calibrated_threshold(val: CaseResults) -> float | None:
    """The lesion-score threshold that best separates lesion from lesion-free cases of a
    validation split (Youden's J: the largest true-positive minus false-positive rate),
    midway between neighbouring scores; None where the split lacks either kind.

    Calibrated where the labels are, at the site: a threshold is a release of its own
    (it depends on the site's cases), so it never leaves with a DP evaluation."""
    if val.lesion_scores is None or val.has_box is None:
        return None
    scores, lesion = val.lesion_scores, val.has_box > 0.5
    if lesion.all() or not lesion.any():
        return None
    cuts = np.unique(scores)
    cuts = np.concatenate(((cuts[:-1] + cuts[1:]) / 2, [cuts[-1] + 1e-6])) if cuts.size > 1 \
        else cuts
    tpr = (scores[lesion][:, None] >= cuts).mean(0)  # (M,)
    fpr = (scores[~lesion][:, None] >= cuts).mean(0)  # (M,)
    return float(cuts[int(np.argmax(tpr - fpr))])


def threshold_on(model: nn.Module, val: Dataset, cfg: ModelConfig, tokenizer: Tokenizer,
                 device: torch.device, batch_size: int = 64) -> float:
    """The lesion threshold `calibrated_threshold` sets on the split `val` (scores only,
    no generation), or `DEFAULT_LESION_THRESHOLD` where there is none to set: no box
    head, no case, or no lesion or no lesion-free case."""
    if not cfg.localisation or len(val) == 0:  # type: ignore[arg-type]
        return DEFAULT_LESION_THRESHOLD
    cases = evaluate_cases(model, val, cfg, tokenizer, device, batch_size=batch_size,
                           generate=False)
    threshold = calibrated_threshold(cases)
    return DEFAULT_LESION_THRESHOLD if threshold is None else threshold


def attention_peak(attention: torch.Tensor) -> torch.Tensor:
    """(B, 2) x, y (fractions of the image) of the centre of each map's highest cell;
    attention (B, h, w)."""
    b, h, w = attention.shape
    best = attention.flatten(1).argmax(-1)  # (B,)
    x = (best % w).to(attention.dtype) + 0.5  # (B,)
    y = torch.div(best, w, rounding_mode="floor").to(attention.dtype) + 0.5  # (B,)
    return torch.stack((x / w, y / h), dim=-1)  # (B, 2)


@torch.no_grad()
def case_losses(model: nn.Module, dataset: Dataset, cfg: ModelConfig, device: torch.device,
                batch_size: int = 64) -> np.ndarray:
    """Each case's multitask loss, (N,) in case order, the report visible as in training:
    what a membership-inference attack reads (a member's loss tends to be lower)."""
    net = unwrap(model).to(device)
    net.eval()
    loss_fn = make_loss_fn(cfg)
    losses: list[float] = []
    for raw in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = Batch.of(raw).to(device)
        out = forward(net, batch, cfg)
        for i in range(batch.size):
            one = slice(i, i + 1)
            case_out = ModelOutput(*(t[one] if t is not None else None for t in out))
            losses.append(float(loss_fn(case_out, Batch(*(t[one] for t in batch)))[0]))
    return np.asarray(losses, dtype=np.float64)


def summarise(cases: CaseResults, num_classes: int) -> dict[str, float]:
    """The exact metrics of one split: loss, classification, localisation, generation."""
    if cases.n == 0:
        return {}
    metrics: dict[str, float] = {}
    for metric in METRICS:
        value = metric.exact(cases, num_classes) if metric.present(cases) else None
        if value is not None:
            metrics[metric.name] = value
    metrics.update(exact_per_label(cases, num_classes))  # one-vs-rest AUROC per label
    return {k: float(v) for k, v in metrics.items()}


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    batch_size: int = 64,
    label_names: tuple[str, ...] = (),
    lesion_threshold: float = DEFAULT_LESION_THRESHOLD,
    train_refs: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """Loss, classification, localisation and generation metrics on one split (exact);
    the constant-report baseline only where `train_refs` are given."""
    cases = evaluate_cases(model, dataset, cfg, tokenizer, device, batch_size=batch_size,
                           label_names=label_names, lesion_threshold=lesion_threshold,
                           train_refs=train_refs)
    return summarise(cases, cfg.num_classes)
