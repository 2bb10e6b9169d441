"""The sample and batch contract between the dataset, the model and the training loop.

A sample is a plain tuple (Opacus' Poisson loader builds empty batches from the shapes
of `dataset[0]`, which needs a sequence of tensors, not a dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Batch(NamedTuple):
    image: torch.Tensor  # (B, C, H, W) float32, normalised with the site's train statistics
    tokens: torch.Tensor  # (B, T) int64 report token ids, PAD=0 after the report, never all PAD
    gen_tokens: torch.Tensor  # (B, G) int64 decoder target: BOS, report ids..., EOS, PAD...
    label: torch.Tensor  # (B,) int64 class index in the federation's label set
    has_box: torch.Tensor  # (B,) float32 1.0 where the case has a lesion box
    box: torch.Tensor  # (B, 4) float32 x0, y0, x1, y1 as fractions; zeros where no box
    describes: torch.Tensor  # (B,) float32 1.0 where the report states the case's finding

    @classmethod
    def of(cls, items: Sequence[torch.Tensor]) -> Batch:
        """A `Batch` from whatever a DataLoader yields (tuple, list or Batch)."""
        return cls(*items)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    @property
    def size(self) -> int:
        """Number of samples (len() of a NamedTuple is its number of fields)."""
        return int(self.label.shape[0])
