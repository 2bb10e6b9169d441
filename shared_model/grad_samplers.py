"""Per-example clipped gradients at near-backward cost: what a DP-SGD step needs, without
Opacus' per-call hooks.

DP-SGD needs, for each example i, its whole gradient g_i (over every trained parameter),
clipped to norm C, and then only the sum sum_i min(1, C / |g_i|) g_i. Opacus' hooks
(`GradSampleModule`) compute every g_i of every parameter in a backward hook per layer
call, and its optimizer then clips and sums them: on this model 2.7-3.3x a plain step,
most of it in the report LSTMs, whose `RNNLinear` layers are called once per time step
(238 hook calls a step, each a small einsum added into a (B, 4H, in) tensor), and in
the vocabulary-sized embeddings, whose (B, V, E) per-example tensors are mostly zeros.

`ClippedGradients` keeps each trained layer's inputs (a forward hook) and output
gradients (a hook on the output tensor, no backward-hook function in the graph), and
after the backward pass computes, layer by layer, one batched product per layer:

- Linear (and DPLSTM's `RNNLinear`): the calls of the step (one per time step) are
  stacked, so per-example gradients are one `bmm` of (B, out, N) by (B, N, in); where
  that is the dearer way (one-row layers, the decoder's vocabulary-sized output), the
  ghost norm instead (`_LinearGhost`: never materialised, the sum one matrix product).
- Embedding: never materialised (a (B, V, E) tensor per step): the norm is the ghost
  norm sum_{t,s} [x_t = x_s] <g_t, g_s>, and the clipped sum one `index_add_`.
- Conv2d: the batch folded into the groups of one grouped convolution, whose weight
  gradient is the per-example gradients (about one weight gradient's cost), or, on
  small outputs and 1x1 kernels, unfold and one `bmm`; GroupNorm: Opacus' formula.

And the forward pass runs with the trained weights detached (`ClippedGradients.run`,
which `ClippedModule` calls): autograd then computes only the layers' output gradients,
not the weight gradients it would sum over the batch and this module would throw away.

The privacy is DP-SGD's, unchanged: each example's gradient over all trained parameters
(its k augmented views averaged first) is clipped to C once, as Opacus' flat clipping
does (min(1, C / (|g_i| + 1e-6))); an example whose norm is not finite contributes
nothing (its rows are zeroed, every step, whether any is dropped or not); the noise
(std noise_multiplier x C), its scaling and the Poisson sampling stay Opacus'
(`client.local.FiniteDPOptimizer` adds them to the sums this module leaves in
`p.summed_grad`). `tests/client/test_grad_samplers.py` checks the per-example norms and
the clipped sums against Opacus' hooks on the same batch.

Gradients as Opacus computes them with `loss_reduction="mean"`: the loss is a mean over
the B*k rows of the batch, so each row's gradient is B*k times what reaches it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from opacus.grad_sample.gsm_no_op import GradSampleModuleNoOp
from opacus.layers.dp_rnn import RNNLinear
from torch import nn

SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, RNNLinear, nn.Conv2d, nn.GroupNorm,
                                          nn.Embedding)


class UnsupportedLayer(TypeError):
    """A trained layer this module has no per-example gradient for."""


def unsupported_layers(model: nn.Module) -> list[str]:
    """The modules holding a trained parameter that no layer `ClippedGradients` knows
    holds too ([] when it covers the model), e.g. to fall back to Opacus' hooks. (DPLSTM
    registers its cells' weights under its own names as well: those are covered.)"""
    owners: dict[int, int] = {}
    for m in model.modules():
        if _known(m):
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
    # a weight two known layers share (tied) would need the norm of their sum: not done
    return [f"{name or '(root)'} ({type(m).__name__})" for name, m in model.named_modules()
            if any(p.requires_grad and owners.get(id(p), 0) != 1
                   for p in m.parameters(recurse=False))]


def _known(m: nn.Module) -> bool:
    return type(m) in SUPPORTED and not (
        isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)
                                      or m.padding_mode != "zeros"))


@dataclass
class _Calls:
    """One layer's inputs and output gradients in this step, one entry per call."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)

    def complete(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(a, g) for a, g in zip(self.inputs, self.grads, strict=True) if g is not None]


class ClippedGradients:
    """Hooks on `model`'s trained layers that turn a backward pass into each example's
    gradient norm and the clipped sum (see the module doc).

        clipper = ClippedGradients(model)
        loss_fn(model(x), y).backward()  # loss: a mean over the rows
        clipper.accumulate(params, max_grad_norm=1.0, multiplicity=k)  # p.summed_grad
        clipper.clear()

    Which parameters are trained is read at each forward pass (`requires_grad`), so a
    model frozen before or after this is built (`shared_model.model.freeze`) is handled.
    A second forward pass before `clear` (gradient accumulation over batches) raises:
    the rows of two batches would be taken for one example each.
    """

    def __init__(self, model: nn.Module) -> None:
        bad = unsupported_layers(model)
        if bad:
            raise UnsupportedLayer(f"no per-example gradient for the trained layers {bad[:3]}")
        self.model = model
        self.calls: dict[nn.Module, _Calls] = {}
        self._handles = []
        self._hooked = [m for m in model.modules()
                        if _known(m) and any(True for _ in m.parameters(recurse=False))]
        self._covered = {id(p) for m in self._hooked for p in m.parameters(recurse=False)}
        for m in self._hooked:
            self._handles.append(m.register_forward_hook(self._forward))
        self._backward_seen = False
        # the layers trained in the forward pass under way with detached weights (`run`)
        self._detached: set[nn.Module] | None = None

    def run(self, model: nn.Module, *args: object, **kwargs: object) -> object:
        """`model(*args, **kwargs)` with the trained weights detached in training: the
        backward pass then computes no weight gradient (what it computes is
        `accumulate`'s job; the layers' output gradients still flow), which saves
        about what a plain step spends on weight gradients. A layer whose input needs
        no gradient (the first convolution, the embeddings) gets an output that does,
        so that its output gradient is still computed."""
        if not (model.training and torch.is_grad_enabled()):
            return model(*args, **kwargs)
        detached = {name: p.detach() for name, p in model.named_parameters()
                    if p.requires_grad and id(p) in self._covered}
        self._detached = {m for m in self._hooked
                          if any(p.requires_grad for p in m.parameters(recurse=False))}
        try:
            return torch.func.functional_call(model, detached, args, kwargs)
        finally:
            self._detached = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.calls.clear()
        self._backward_seen = False

    # ------------------------------------------------------------------ capture

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor
                 ) -> torch.Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if self._detached is not None:
            if module not in self._detached:
                return None
            if not output.requires_grad:  # nothing before it trains: a leaf, for its grad
                output = output.detach().requires_grad_()
        elif not (output.requires_grad
                  and any(p.requires_grad for p in module.parameters(recurse=False))):
            return None
        if self._backward_seen:
            raise RuntimeError(
                "a forward pass after a backward pass without the optimizer's step or "
                "zero_grad between: gradient accumulation over batches is not supported "
                "(each row must be one example's view of this batch)")
        calls = self.calls.setdefault(module, _Calls())
        index = len(calls.inputs)
        calls.inputs.append(inputs[0].detach())
        calls.grads.append(None)

        def keep(grad: torch.Tensor) -> None:
            self._backward_seen = True
            calls.grads[index] = grad.detach()

        output.register_hook(keep)
        return output

    # ------------------------------------------------------------------ clip and sum

    def accumulate(self, params: Sequence[nn.Parameter], *, max_grad_norm: float,
                   multiplicity: int = 1) -> torch.Tensor:
        """Sets `p.summed_grad` of every parameter of `params` to the sum over examples
        of its clipped gradient, and returns the examples' gradient norms (B,) (before
        clipping; NaN or inf for an example that was dropped).

        `multiplicity` k: rows i*k .. i*k+k-1 are example i's views; their gradients
        are averaged into the example's before clipping (one example, one clip)."""
        wanted = {id(p) for p in params}
        if wanted - self._covered:  # trained since `__init__`, in a layer it cannot do
            raise UnsupportedLayer("a trained parameter outside the layers hooked")
        layers = [_layer_terms(m, calls.complete(), multiplicity, wanted)
                  for m, calls in self.calls.items()]
        layers = [t for t in layers if t is not None]
        rows = next((t.rows for t in layers), 0)
        if any(t.rows != rows for t in layers):
            raise RuntimeError("layers saw different numbers of rows in one step")
        if rows % multiplicity:
            raise RuntimeError(f"{rows} rows are not whole groups of {multiplicity} views")
        n = rows // multiplicity
        device = params[0].device if params else torch.device("cpu")
        sq = torch.zeros(n, device=device, dtype=torch.float32)
        for t in layers:
            sq = sq + t.squared_norms().to(device)
        # the loss is a mean over the rows: a row's gradient is `rows` times what the
        # hooks saw, an example's the mean of its k rows'
        norms = sq.sqrt() * float(rows)
        # (B,) every step, whether it drops one or none; a squared norm past float32's
        # range (a norm above ~1e19) is dropped too, where Opacus would clip it: either
        # way the example adds at most C
        drop = ~torch.isfinite(norms)
        clip = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        clip = torch.where(drop, torch.zeros_like(clip), clip) * float(rows)
        done: set[int] = set()
        for t in layers:
            for p, summed in t.clipped_sums(clip, drop):
                _add_summed(p, summed)
                done.add(id(p))
        for p in params:  # a trained parameter no row reached (an empty batch)
            if id(p) not in done:
                _add_summed(p, torch.zeros_like(p))
        return norms


def _add_summed(p: nn.Parameter, summed: torch.Tensor) -> None:
    summed = summed.to(p.dtype).view_as(p)
    if getattr(p, "summed_grad", None) is not None:
        p.summed_grad = p.summed_grad + summed
    else:
        p.summed_grad = summed


class _Terms:
    """One layer's per-example quantities: materialised per-example gradients, or what
    the ghost norm needs. `rows`: the rows of the batch (B*k)."""

    rows: int

    def squared_norms(self) -> torch.Tensor:  # (B,) examples' squared norms, unscaled
        raise NotImplementedError

    def clipped_sums(self, clip: torch.Tensor, drop: torch.Tensor
                     ) -> Iterable[tuple[nn.Parameter, torch.Tensor]]:
        raise NotImplementedError


class _Materialised(_Terms):
    """Per-example gradients, (B, *p.shape) each (already averaged over the views)."""

    def __init__(self, rows: int, grads: dict[nn.Parameter, torch.Tensor]) -> None:
        self.rows = rows
        self.grads = grads

    def squared_norms(self) -> torch.Tensor:
        total = None
        for g in self.grads.values():
            s = torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).square()
            total = s if total is None else total + s
        assert total is not None
        return total

    def clipped_sums(self, clip, drop):
        for p, g in self.grads.items():  # the tensors are this step's own: in place
            g = g.reshape(len(g), -1).masked_fill_(drop.unsqueeze(1), 0.0)
            yield p, clip.to(g.dtype) @ g


class _EmbeddingGhost(_Terms):
    """An embedding's per-example gradient, never materialised: example i's gradient is
    sum_t onehot(x_it) g_it^T over its tokens (all its views' tokens), so its squared
    norm is sum_{t,s} [x_it = x_is] <g_it, g_is>, and the clipped sum an index_add."""

    def __init__(self, rows: int, weight: nn.Parameter, ids: torch.Tensor,
                 grads: torch.Tensor) -> None:
        self.rows, self.weight, self.ids, self.grads = rows, weight, ids, grads  # (B,N), (B,N,E)

    def squared_norms(self) -> torch.Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.grads.dtype)
        dots = torch.bmm(self.grads, self.grads.transpose(1, 2))  # (B, N, N)
        return (same * dots).sum((1, 2))

    def clipped_sums(self, clip, drop):
        g = self.grads.masked_fill(drop.view(-1, 1, 1), 0.0) * clip.view(-1, 1, 1)
        out = torch.zeros_like(self.weight)
        out.index_add_(0, self.ids.reshape(-1), g.reshape(-1, g.shape[-1]).to(out.dtype))
        yield self.weight, out


class _LinearGhost(_Terms):
    """A linear layer's per-example weight gradient g_i^T a_i (a_i (N, in) the inputs at
    the example's N positions, g_i (N, out) the gradients there), never materialised:
    its squared norm is sum_{t,s} <a_t, a_s> <g_t, g_s> (the ghost norm, Goodfellow
    2015; Li et al. 2022), and the clipped sum one matrix product (c g)^T a over all rows.
    Cheaper than materialising when N (in + out) is well below in * out: the one-row
    fusion layers, the decoder's vocabulary-sized output."""

    def __init__(self, rows: int, layer: nn.Linear, a: torch.Tensor, g: torch.Tensor,
                 wanted: set[int]) -> None:
        self.rows, self.a, self.g = rows, a, g  # (B, N, in), (B, N, out)
        self.weight = layer.weight if layer.weight.requires_grad and id(
            layer.weight) in wanted else None
        bias = layer.bias
        self.bias = bias if bias is not None and bias.requires_grad and id(bias) in wanted \
            else None
        self.bias_grads = g.sum(1) if self.bias is not None else None  # (B, out)

    def squared_norms(self) -> torch.Tensor:
        total = torch.zeros(len(self.g), dtype=self.g.dtype, device=self.g.device)
        if self.weight is not None:
            if self.a.shape[1] == 1:  # one position: |g a^T| = |g| |a|
                total = total + (self.a.square().sum((1, 2)) * self.g.square().sum((1, 2)))
            else:
                aa = torch.bmm(self.a, self.a.transpose(1, 2))  # (B, N, N)
                gg = torch.bmm(self.g, self.g.transpose(1, 2))  # (B, N, N)
                total = total + (aa * gg).sum((1, 2))
        if self.bias_grads is not None:
            total = total + self.bias_grads.square().sum(1)
        return total

    def clipped_sums(self, clip, drop):
        if self.weight is not None:  # a dropped example's inputs may be NaN too: both
            rows = drop.view(-1, 1, 1)
            g = self.g.masked_fill(rows, 0.0)
            a = self.a.to(g.dtype).masked_fill(rows, 0.0) * clip.view(-1, 1, 1).to(g.dtype)
            yield self.weight, g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
        if self.bias is not None and self.bias_grads is not None:
            b = self.bias_grads.masked_fill(drop.unsqueeze(1), 0.0)
            yield self.bias, clip.to(b.dtype) @ b


def _ghost_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """Measured on this model's layers (batch 32, one core): the ghost norm wins where
    2 N (in + out) < in * out (one-row layers by 10x, the decoder output slightly);
    materialising wins for the LSTM cells over 48 steps."""
    return 2 * positions * (d_in + d_out) < d_in * d_out


def _stacked(parts: list[torch.Tensor], rows: int, k: int) -> torch.Tensor:
    """(B, k*N, d) from each call's (B*k, ..., d): an example's positions in every call
    and view side by side (one call: a view of it, no copy)."""
    mine = [_by_example(x.reshape(rows, -1, x.shape[-1]), k) for x in parts]
    return mine[0] if len(mine) == 1 else torch.cat(mine, 1)


def _by_example(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B*k, N, d) rows -> (B, k*N, d): an example's views' positions side by side."""
    return x.reshape(x.shape[0] // k, -1, x.shape[-1])


def _layer_terms(module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], k: int,
                 wanted: set[int]) -> _Terms | None:
    trained = [p for p in module.parameters(recurse=False)
               if p.requires_grad and id(p) in wanted]
    rows = calls[0][0].shape[0] if calls else 0
    if not rows or not trained:  # an empty Poisson batch: zero sums (`accumulate`)
        return None
    if any(a.shape[0] != rows or g.shape[0] != rows for a, g in calls):
        raise UnsupportedLayer(f"{type(module).__name__} called on batches of different "
                               "sizes in one step (packed sequences)")
    if isinstance(module, nn.Linear):  # RNNLinear too: every call (time step) stacked
        a = _stacked([a for a, _ in calls], rows, k)  # (B, k*N, in)
        g = _stacked([g for _, g in calls], rows, k)  # (B, k*N, out)
        if k > 1:
            g = g / k  # the example's gradient is the mean over its views'
        if _ghost_is_cheaper(a.shape[1], a.shape[2], g.shape[2]):
            return _LinearGhost(rows, module, a, g, wanted)
        grads: dict[nn.Parameter, torch.Tensor] = {}
        if module.weight.requires_grad and id(module.weight) in wanted:
            grads[module.weight] = torch.bmm(g.transpose(1, 2), a.to(g.dtype))  # (B, out, in)
        if module.bias is not None and module.bias.requires_grad and id(module.bias) in wanted:
            grads[module.bias] = g.sum(1)  # (B, out)
        return _Materialised(rows, grads)
    if isinstance(module, nn.Embedding):
        ids = torch.cat([_by_example(a.reshape(rows, -1, 1), k)[..., 0] for a, _ in calls], 1)
        g = _stacked([g for _, g in calls], rows, k)
        return _EmbeddingGhost(rows, module.weight, ids, g / k if k > 1 else g)
    per_row: dict[nn.Parameter, torch.Tensor] = {}
    for a, g in calls:
        if isinstance(module, nn.Conv2d):
            part = _conv2d_rows(module, a, g)
        else:
            part = _group_norm_rows(module, a, g)
        for p, gs in part.items():
            per_row[p] = per_row[p] + gs if p in per_row else gs
    grads = {p: (gs if k == 1 else gs.view(rows // k, k, *gs.shape[1:]).mean(1))
             for p, gs in per_row.items() if id(p) in wanted}
    return _Materialised(rows, grads)


def _conv2d_rows(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor
                 ) -> dict[nn.Parameter, torch.Tensor]:
    """Each row's gradient of a Conv2d (groups 1). Where the output has more than 16
    positions and the kernel is wider than 1x1, at about one weight gradient's cost: the
    batch folded into the channels, the rows are the groups of one grouped convolution,
    whose weight gradient (B*out, in, kh, kw) is the rows' gradients (what
    `torch.func.vmap` does for a convolution); unfolding (Opacus' way) took 3-10x
    longer there. On a small output (the 4x4 maps of 32 px images) or a 1x1 kernel,
    unfolding and one `bmm` is the quicker (the grouped convolution up to 6x slower)."""
    n = a.shape[0]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    w = layer.weight
    if w.requires_grad:
        a = a.to(g.dtype)
        if g[0, 0].numel() <= 16 or tuple(layer.kernel_size) == (1, 1):
            cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation,
                            padding=layer.padding, stride=layer.stride)  # (n, in*kh*kw, L)
            gw = torch.bmm(g.reshape(n, g.shape[1], -1), cols.transpose(1, 2))
        else:
            _, gw, _ = torch.ops.aten.convolution_backward(
                g.reshape(1, n * g.shape[1], *g.shape[2:]),
                a.reshape(1, n * a.shape[1], *a.shape[2:]),
                w.detach().repeat(n, 1, 1, 1), None, list(layer.stride),
                list(layer.padding), list(layer.dilation), False, [0, 0], n,
                [False, True, False])
        ret[w] = gw.reshape(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.flatten(2).sum(2)
    return ret


def _group_norm_rows(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
                     ) -> dict[nn.Parameter, torch.Tensor]:
    """Each row's gradient of a GroupNorm's scale and shift (Opacus' grad sampler, with
    sums in place of its einsums): the normalised input times the output gradient, and
    the output gradient, summed over the positions."""
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.group_norm(a.to(g.dtype), layer.num_groups, eps=layer.eps)
        ret[layer.weight] = (normed * g).flatten(2).sum(2)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = g.flatten(2).sum(2)
    return ret


class ClippedModule(GradSampleModuleNoOp):
    """The model as `make_private` hands it out with `ClippedGradients`: Opacus' no-op
    wrapper (`_module` is the model), whose forward pass runs through `clipper.run`."""

    def __init__(self, m: nn.Module, clipper: ClippedGradients) -> None:
        super().__init__(m)
        self.clipper = clipper

    def forward(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        return self.clipper.run(self._module, *args, **kwargs)
