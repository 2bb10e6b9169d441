"""The model's configuration: the only constructor argument of `MedFuseModel`.

Everything that changes the shapes of the shared arrays lives here, so two nodes that
agree on a `ModelConfig` agree on every array name, shape and dtype that crosses the
network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fusion = Literal["concat", "gated", "bilinear"]
Modality = Literal["fused", "image", "text"]
ModelSize = Literal["small", "large"]
# What the private rounds of a run train (run config `dp-train-layers`): here, with no torch,
# so that the run config's module loads without the model's (`shared_model.model.FROZEN`
# says which parameters each choice freezes).
TrainLayers = Literal["all", "no-embeddings", "heads", "classifier", "prior"]
# what a train reply carries: float32 weights, or the update in 16 bits (contract.compression)
UpdateDtype = Literal["float32", "float16", "bfloat16"]
# Upper bounds on every size of the model: a model file can come from anyone, so its config
# is data, and each size is at most about 8x what `large()` uses (`large()` is 5.3 M
# parameters). The parameter count these sizes multiply into is capped separately
# (shared_model/model_file.py) before any module is built.
MAX_WIDTH = 1024  # channels of a CNN stage
MAX_STAGES = 8
MAX_VOCAB = 65536
MAX_DIM = 2048  # embedding, LSTM and decoder widths
MAX_FUSED_DIM = 4096
MAX_BILINEAR_RANK = 64
MAX_CLASSES = 1000
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
MANIFEST = "manifest.csv"  # the file that makes a folder a site (dataset format v1)
CACHE_ENV = "MEDFUSE_CACHE"


def cache_root() -> Path:
    """What medfuse builds once and reuses (synthetic sites, public models):
    $MEDFUSE_CACHE, else ~/.cache/medfuse."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path("~/.cache/medfuse").expanduser()

# The lesion score above which a box is drawn where none was calibrated: the score the
# lesion loss (a balanced binary cross-entropy) makes a coin flip.
DEFAULT_LESION_THRESHOLD = 0.5
DEFAULT_LABELS: tuple[str, ...] = ("normal", "pneumonia", "nodule", "effusion", "cardiomegaly")
MAX_LABEL_CHARS = 64
LABEL_RULE = (f"a label is 1-{MAX_LABEL_CHARS} printable characters, no comma, no control "
              "characters, no leading or trailing space")


def label_problem(label: object) -> str:
    """What makes `label` unusable as a label name ("" when nothing does): names are
    printed in tables, CSV cells, HTML pages and comma-separated options, and a model
    file refuses what this refuses, so a run must not train under such a name."""
    return ("is not a string" if not isinstance(label, str)
            else "is empty" if not label
            else f"is longer than {MAX_LABEL_CHARS} characters" if len(label) > MAX_LABEL_CHARS
            else "has a control or formatting character" if not label.isprintable()
            else "has a comma" if "," in label
            else "has a leading or trailing space" if label != label.strip()
            else "")


def parse_label_set(text: str) -> tuple[str, ...]:
    """A comma-separated label set (run config `labels`, `--labels`, a simulation's
    `[model] labels`) as its names; `ValueError` naming what is wrong: fewer than two,
    a name twice, or a name a model file would refuse (`label_problem`)."""
    labels = tuple(x.strip() for x in text.split(",") if x.strip())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"labels={text!r}: need at least two distinct labels")
    for label in labels:
        if problem := label_problem(label):
            raise ValueError(f"labels={text!r}: {label!r} {problem}; {LABEL_RULE}")
    return labels


class ModelConfig(BaseModel):
    """Shapes and switches of the multimodal model.

    `small()` trains on two CPU cores in minutes; `large()` is for sites with a GPU.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # image encoder
    image_size: int = Field(64, ge=16, le=1024, description="square input side in pixels")
    in_channels: int = Field(1, ge=1, le=3)
    cnn_widths: tuple[Width, ...] = Field((16, 32, 64), min_length=1, max_length=MAX_STAGES)
    cnn_blocks_per_stage: int = Field(1, ge=1, le=8)
    norm_groups: int = Field(8, ge=1, le=MAX_WIDTH,
                             description="GroupNorm groups; divides every width")

    # text encoder
    vocab_size: int = Field(2560, ge=64, le=MAX_VOCAB,
                            description="fixed words + specials + hash buckets")
    max_report_tokens: int = Field(48, ge=4, le=1024)
    embed_dim: int = Field(64, ge=8, le=MAX_DIM)
    lstm_hidden: int = Field(64, ge=8, le=MAX_DIM, description="per direction")

    # fusion
    fusion: Fusion = "gated"
    modality: Modality = "fused"
    fused_dim: int = Field(128, ge=8, le=MAX_FUSED_DIM)
    bilinear_rank: int = Field(16, ge=1, le=MAX_BILINEAR_RANK)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    report_dropout: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="training only: chance a sample's report is replaced by the EMPTY token, "
        "so the model learns to read the image alone (uninformative reports, generation)",
    )

    # heads
    num_classes: int = Field(len(DEFAULT_LABELS), ge=2, le=MAX_CLASSES)
    localisation: bool = True
    generation: bool = True
    max_gen_tokens: int = Field(24, ge=4, le=256, description="decoder target length incl. bos/eos")
    decoder_hidden: int = Field(96, ge=8, le=MAX_DIM)

    # loss weights
    loss_cls: float = Field(1.0, ge=0.0)
    loss_box: float = Field(1.0, ge=0.0)
    loss_lesion: float = Field(0.5, ge=0.0)
    loss_gen: float = Field(0.3, ge=0.0)
    loss_aux_image: float = Field(
        1.0, ge=0.0, description="fused models: image-only auxiliary classifier (0 = none)"
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        bad = [w for w in self.cnn_widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"norm_groups={self.norm_groups} must divide every cnn_widths entry; "
                f"it does not divide {bad}"
            )
        if self.image_size % (2 ** len(self.cnn_widths)):
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**len(cnn_widths)="
                f"{2 ** len(self.cnn_widths)}"
            )
        if self.generation and self.modality == "text":
            raise ValueError(
                "generation=True needs the image (modality 'fused' or 'image'): the report "
                "decoder is evaluated with the report hidden, so a text-only model has "
                "nothing to describe"
            )
        return self

    @classmethod
    def small(cls, **overrides: object) -> ModelConfig:
        """Trains on 2 CPU cores: 64 px, three stages, 64-unit LSTM."""
        return cls(**overrides)  # type: ignore[arg-type]

    @classmethod
    def large(cls, **overrides: object) -> ModelConfig:
        """For GPU sites: 224 px, four deeper stages, wider text and fusion."""
        base: dict[str, object] = dict(
            image_size=224,
            cnn_widths=(32, 64, 128, 256),
            cnn_blocks_per_stage=2,
            norm_groups=16,
            embed_dim=128,
            lstm_hidden=128,
            fused_dim=256,
            decoder_hidden=192,
            max_report_tokens=128,
            max_gen_tokens=48,
        )
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


class CentralConfig(BaseModel):
    """Hyper-parameters of a centrally trained (pooled or local-only) baseline."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(2e-3, gt=0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    device: str = "auto"
    # random views of every batch (shared_model.augment): "strong" is the public model's
    # domain randomisation, so that its features fit scanners and report habits it never saw
    views: Literal["none", "mild", "strong"] = "none"


CENTRAL = CentralConfig()  # the defaults, which the commands show as their own
