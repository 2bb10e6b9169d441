"""Random views of a batch: one mechanism for two jobs.

- **Augmentation multiplicity** (De et al. 2022) under DP: each example is seen as `k`
  random views whose per-sample gradients are averaged before clipping
  (`client.local.FiniteDPOptimizer`), so the privacy cost is that of one example while
  the gradient is less noisy about what the label does not depend on. `MILD` views:
  changes a hospital's own films show anyway (a little contrast, offset, noise, shift).
- **Domain randomisation** when pretraining the public model: `STRONG` views stand for
  scanners and report habits the public archive lacks (intensity curves, blur, noise,
  resizing and crops, words dropped), so that its features fit hospitals it never saw.

Every draw comes from torch's global generator: under DP the client seeds it from the
operating system's secret randomness (`client.local.secret_seed`), never from anything
the server knows. A view keeps the label; a box moves with the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared_model.batch import Batch
from shared_model.tokenizer import EMPTY, PAD


@dataclass(frozen=True)
class Views:
    """How far a view may move from the original (0 = not at all)."""

    contrast: float  # gain drawn from [1 - c, 1 + c]
    offset: float  # brightness offset from [-o, o], in units of the site's std
    gamma: float  # exponent of a monotone intensity curve from [1/(1+g), 1+g]
    noise: float  # std of added Gaussian noise, in units of the site's std
    blur: float  # share of a 3x3 box blur blended in, from [0, b]
    shift: float  # translation as a fraction of the side, from [-s, s] in x and y
    zoom: float  # scale from [1 - z, 1 + z] (a crop or a margin), boxes follow
    word_dropout: float  # chance that a report word is replaced by a blank


MILD = Views(contrast=0.1, offset=0.1, gamma=0.1, noise=0.05, blur=0.0, shift=0.05,
             zoom=0.05, word_dropout=0.0)
STRONG = Views(contrast=0.3, offset=0.3, gamma=0.5, noise=0.2, blur=0.7, shift=0.1,
               zoom=0.15, word_dropout=0.1)


def repeat(batch: Batch, k: int) -> Batch:
    """Each row `k` times in a row: rows i*k .. i*k+k-1 are example i's views."""
    if k == 1:
        return batch
    return Batch(*(t.repeat_interleave(k, dim=0) for t in batch))


def _uniform(n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(n, device=like.device, dtype=like.dtype) * (high - low) + low


def _intensity(image: torch.Tensor, v: Views) -> torch.Tensor:
    """Gain, offset, a gamma curve (on the min-max range of each image), noise, blur."""
    n = len(image)
    x = image
    if v.gamma > 0:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
        g = torch.exp(_uniform(n, -1.0, 1.0, x) * torch.log1p(torch.tensor(v.gamma)))
        x = ((x - lo) / span).clamp(0, 1).pow(g.view(n, 1, 1, 1)) * span + lo
    gain = _uniform(n, 1 - v.contrast, 1 + v.contrast, x).view(n, 1, 1, 1)
    shift = _uniform(n, -v.offset, v.offset, x).view(n, 1, 1, 1)
    x = x * gain + shift
    if v.blur > 0:
        blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        w = _uniform(n, 0.0, v.blur, x).view(n, 1, 1, 1)
        x = x * (1 - w) + blurred * w
    if v.noise > 0:
        x = x + torch.randn_like(x) * v.noise
    return x


def _geometry(image: torch.Tensor, box: torch.Tensor, has_box: torch.Tensor,
              v: Views) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zoom and shift by one affine map per image; boxes mapped the same way and clipped
    to the frame (a box pushed out of the frame is no box)."""
    n = len(image)
    scale = _uniform(n, 1 - v.zoom, 1 + v.zoom, image)  # input span per output span
    t = torch.stack([_uniform(n, -2 * v.shift, 2 * v.shift, image) for _ in range(2)], 1)
    theta = torch.zeros(n, 2, 3, device=image.device, dtype=image.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    out = F.grid_sample(image, grid, padding_mode="border", align_corners=False)
    # a point u_in (in [-1, 1]) lands at u_out = (u_in - t) / scale
    u = box * 2 - 1  # (n, 4): x0, y0, x1, y1
    shift_xy = t.repeat(1, 2)
    moved = (((u - shift_xy) / scale.view(n, 1)) + 1) / 2
    moved = moved.clamp(0, 1)
    kept = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1]) & (has_box > 0)
    new_box = torch.where(kept.view(n, 1), moved, torch.zeros_like(moved))
    return out, new_box, kept.to(has_box.dtype)


def _drop_words(tokens: torch.Tensor, p: float) -> torch.Tensor:
    """Report words replaced by EMPTY (the tokenizer's "hidden") with chance `p`; PAD
    stays PAD, so a report is never all PAD."""
    drop = (torch.rand(tokens.shape, device=tokens.device) < p) & (tokens != PAD)
    return torch.where(drop, torch.full_like(tokens, EMPTY), tokens)


def augment(batch: Batch, v: Views) -> Batch:
    """A random view of every row of `batch` (B rows in, B rows out; an empty batch stays
    empty). The decoder's target report is left as it is: a view changes what the model
    reads, not what it should write."""
    if batch.size == 0:
        return batch
    image = _intensity(batch.image, v)
    image, box, has_box = _geometry(image, batch.box, batch.has_box, v)
    tokens = _drop_words(batch.tokens, v.word_dropout) if v.word_dropout > 0 else batch.tokens
    return batch._replace(image=image, tokens=tokens, box=box, has_box=has_box)


def views_of(k: int, v: Views = MILD):
    """The batch transform of augmentation multiplicity `k`: each example as k views
    (`k` = 1: the batch as it is)."""
    if k == 1:
        return None
    return lambda batch: augment(repeat(batch, k), v)


def views_for(name: str):
    """The batch transform of a config's `views` ("none", "mild", "strong"): one random
    view of each example per step."""
    if name == "none":
        return None
    v = {"mild": MILD, "strong": STRONG}[name]
    return lambda batch: augment(batch, v)
