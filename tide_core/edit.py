"""Feature-guided editing: change an SAE's latents of one DiT block during a window of sampling steps.

At each step in the window the hook encodes the block output x with the SAE, edits the latents z -> z',
and writes back

    x' = x + dec(z') - dec(z)

so the SAE's reconstruction error x - dec(z) stays in the stream: an empty edit returns x exactly, and
only what the edit changes moves the image (writing dec(z') alone would add the reconstruction error at
every edited step, which the spliced evaluation shows costs accuracy by itself).

Ops on the chosen features f (latents are in the SAE's scaled units; ``unit_f`` rescales the strength per
feature, e.g. to multiples of its mean activation; default 1; with ``feature_maps`` it also varies over
tokens, e.g. following where the feature usually fires):

    add    z_f += strength * unit_f                  every token: steer towards the feature
    clamp  z_f  = strength * unit_f                  every token
    scale  z_f *= strength                           where it fires (for TopK: among the token's top k)
    zero   z_f  = 0                                  ablate (strength unused)
    style  z_f += strength * (zref_f - z_f)          token by token; zref from a reference image;
                                                     strength 1 copies it; no features named = all
           pooled: z_f *= (1 + strength * (mean zref_f / mean z_f - 1)), means over the image's tokens:
           each feature's overall intensity moves to the reference's while its layout stays the target's

Batch layout: the sampler runs [targets; references] (per CFG half: [cond; uncond] of that). Style edits
target i towards reference i mod n_references; references themselves are never edited, so they come out
exactly as they would unedited and their latents at each step are the ones an unedited run has.

CFG renorm is a sampler setting (``Sampler(cfg_renorm=...)``), not part of an edit: it applies to the guided
noise prediction of before and after images alike, so the comparison isolates the edit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from tide_core.capture import BlockHook
from tide_core.edit_windows import WINDOW_NAMES, EditError, StepWindow  # noqa: F401 - re-exported
from tide_core.models.base import DiTAdapter

EditOp = Literal["add", "scale", "clamp", "zero", "style"]
EDIT_OPS: tuple[str, ...] = get_args(EditOp)
Branch = Literal["both", "cond"]


def check_branch(branch: str) -> None:
    """The CFG halves an edit or steering hook may change: both, or the conditional one."""
    if branch not in get_args(Branch):
        raise EditError(f"branch must be 'both' or 'cond', got {branch!r}")


def edited_halves(branch: Branch, guided: bool) -> tuple[int, int]:
    """(halves in the batch, halves to edit): a guided batch stacks [cond; uncond], the cond half first, so
    editing the first ``edited`` of ``halves`` edits what ``branch`` asks for."""
    halves = 2 if guided else 1
    return halves, 1 if branch == "cond" else halves


@dataclass(frozen=True)
class EditSpec:
    """One feature edit: which latents, how, how much and when."""

    op: EditOp
    feature_ids: tuple[int, ...]  # latents to edit; empty = all (style only)
    strength: float
    window: StepWindow
    branch: Branch = "both"  # CFG halves edited: both (like splicing) or the conditional one only
    pooled: bool = False  # style only: match per-feature means over tokens instead of copying token by token

    def check(self, n_latents: int, num_steps: int) -> None:
        """Raise EditError for anything that cannot work with an SAE of n_latents and this schedule."""
        if self.op not in EDIT_OPS:
            raise EditError(f"unknown edit op {self.op!r}: use one of {', '.join(EDIT_OPS)}")
        check_feature_ids(self.feature_ids, n_latents)
        if not math.isfinite(self.strength):
            raise EditError(f"strength must be a finite number, got {self.strength}")
        if self.op in ("scale", "style") and self.strength < 0:
            raise EditError(f"op {self.op!r} takes strength >= 0 (got {self.strength}): "
                            + ("1 keeps the feature, 0 zeroes it" if self.op == "scale"
                               else "1 copies the reference's latents, 0 changes nothing"))
        check_branch(self.branch)
        if self.pooled and self.op != "style":
            raise EditError(f"pooled applies to op 'style' only, not {self.op!r}")
        self.window.check(num_steps)


def check_feature_ids(feature_ids: Sequence[int], n_latents: int) -> None:
    bad = [int(f) for f in feature_ids if not 0 <= int(f) < n_latents]
    if bad:
        raise EditError(f"unknown feature id(s) {bad}: this SAE has {n_latents} latents, ids 0..{n_latents - 1}")
    if len(set(feature_ids)) != len(feature_ids):
        raise EditError(f"feature ids {list(feature_ids)} contain duplicates")


def check_sae_fits(model: DiTAdapter, layer: int, sae) -> None:
    """The SAE must have been trained on this layer's block output of a model of this width."""
    n_blocks = model.num_layers
    if not 0 <= layer < n_blocks:
        raise EditError(f"layer {layer} does not exist: the model has {n_blocks} blocks (0..{n_blocks - 1})")
    trained_on = sae.meta.get("layer")
    name = sae.meta.get("sae_id") or sae.source or "the SAE"
    if trained_on is not None and int(trained_on) != layer:
        raise EditError(f"{name} was trained on layer {trained_on}, not layer {layer}: edit layer {trained_on} "
                        f"or use an SAE trained on layer {layer}")
    site = sae.meta.get("site", "resid")
    if site != "resid":
        raise EditError(f"{name} was trained on the {site!r} site; the edit hook changes the block output "
                        "('resid'): use a resid SAE")
    width = model.hidden_size
    if int(width) != sae.spec.d_in:
        raise EditError(f"{name} expects {sae.spec.d_in} channels but the model's blocks output {width}: "
                        "it belongs to another model; use an SAE trained on this one")


@dataclass(frozen=True)
class StepRecord:
    """What the hook did at one step (for tests and reports). The norms are 0-dim tensors on the model's
    device, so recording them does not wait for the GPU; read them once sampling is done."""

    step: int
    delta_norm: torch.Tensor  # mean L2 norm of dec(z') - dec(z) over edited target tokens, activation scale
    act_norm: torch.Tensor  # mean L2 norm of the block output over the same tokens

    @staticmethod
    def mean_ratio(records: Sequence[StepRecord]) -> float:
        """Mean over steps of delta_norm / act_norm (one device sync); 0 without records."""
        if not records:
            return 0.0
        norms = torch.stack([torch.stack([r.delta_norm, r.act_norm]) for r in records]).double().cpu()  # [S, 2]
        return float((norms[:, 0] / norms[:, 1].clamp_min(1e-12)).mean())


class EditHook(BlockHook):
    """A StepObserver + forward hook on block ``layer``'s output applying an EditSpec.

    ``row_features`` gives each target row its own feature list (overriding ``spec.feature_ids``), so one
    batch can steer every sample towards a different class. ``feature_units`` maps feature id -> unit of
    strength for add / clamp; ``feature_maps`` maps feature id -> a weight per image token (row-major patch
    grid) multiplying that unit. ``n_references`` trailing rows of the batch are style references.
    """

    def __init__(self, model: DiTAdapter, layer: int, sae, spec: EditSpec, num_steps: int, *,
                 row_features: Sequence[Sequence[int]] | None = None,
                 feature_units: Mapping[int, float] | None = None,
                 feature_maps: Mapping[int, Sequence[float]] | None = None, n_references: int = 0):
        check_sae_fits(model, layer, sae)
        spec.check(sae.spec.n_latents, num_steps)
        n_lat = sae.spec.n_latents
        if (spec.op == "style") != (n_references > 0):
            raise EditError("op 'style' needs reference rows (n_references >= 1) and only style uses them: "
                            f"got op {spec.op!r} with n_references={n_references}")
        if row_features is None and not spec.feature_ids and spec.op != "style":
            raise EditError(f"op {spec.op!r} needs at least one feature id (only 'style' defaults to all)")
        rows = [list(f) for f in row_features] if row_features is not None else [list(spec.feature_ids)]
        for feats in rows:
            check_feature_ids(feats, n_lat)
        for f in [*(feature_units or {}), *(feature_maps or {})]:
            check_feature_ids([f], n_lat)
        # Only the edited columns of z change, so the hook works on their union F: encoding still costs a
        # full pass, but the write-back is dz [.., |F|] @ W_dec[F] instead of two dense decodes.
        union = sorted({f for feats in rows for f in feats}) or list(range(n_lat))
        col = {f: j for j, f in enumerate(union)}
        mask = torch.zeros(len(rows), len(union), dtype=torch.bool)  # [n_targets or 1, |F|]
        for i, feats in enumerate(rows):
            if feats:
                mask[i, [col[f] for f in feats]] = True
            elif spec.op == "style":  # no features named: every latent; for other ops, an empty row is untouched
                mask[i] = True
        units = torch.tensor([[float((feature_units or {}).get(f, 1.0)) for f in union]])  # [1, |F|]
        if feature_maps:
            sizes = {len(m) for m in feature_maps.values()}
            if len(sizes) != 1:
                raise EditError(f"feature maps must all cover the same token grid; got lengths {sorted(sizes)}")
            n_tok = sizes.pop()
            maps = torch.ones(n_tok, len(union))  # [T, |F|]
            for f, m in feature_maps.items():
                if f in col:
                    maps[:, col[f]] = torch.as_tensor(m, dtype=torch.float32)
            units = units * maps  # [T, |F|]
        self.model, self.layer, self.sae, self.spec = model, layer, sae, spec
        self.n_references = n_references
        self.n_targets = len(row_features) if row_features is not None else None
        device = next(sae.parameters()).device
        self._features = torch.tensor(union, dtype=torch.long, device=device)  # [|F|]
        self._mask = mask.to(device)
        self._units = units.to(device)
        # dec(z') - dec(z) = (z' - z) W_dec / input_scale (the decoder bias cancels): the rows of the edited
        # columns, divided once here instead of at every step.
        with torch.no_grad():
            self._w_delta = (sae.W_dec[self._features] / sae.input_scale).detach()  # [|F|, D]
        self.records: list[StepRecord] = []
        self._step = self._timestep = 0
        self._guided, self._active = False, False

    # --- StepObserver --------------------------------------------------------------------------------

    def begin_step(self, step: int, timestep: int, batch: int, guided: bool) -> None:
        n_t = batch - self.n_references
        if n_t < 1 or (self.n_targets is not None and n_t != self.n_targets):
            want = self.n_targets if self.n_targets is not None else ">= 1"
            raise EditError(f"the batch has {batch} rows with {self.n_references} reference(s), so {n_t} "
                            f"targets, but the edit was built for {want}: sample [targets; references]")
        self._step, self._timestep, self._guided = step, timestep, guided
        self._active = step in self.spec.window

    def end_step(self, step: int) -> None:
        self._active = False

    # --- the edit --------------------------------------------------------------------------------------

    def edit_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z [H, n, T, |F|] (H CFG halves edited, n = targets + references; the edited columns F only) ->
        the edited latents; reference rows are returned unchanged."""
        n_t = z.shape[1] - self.n_references
        tgt = z[:, :n_t]  # [H, n_t, T, |F|]
        mask = self._mask[None, :, None, :]  # [1, n_t or 1, 1, |F|]; units: [T or 1, |F|]
        s = self.spec.strength
        op = self.spec.op
        if op == "add":
            new = tgt + mask * (s * self._units)
        elif op == "clamp":
            new = torch.where(mask, (s * self._units).expand_as(tgt), tgt)
        elif op == "scale":
            new = torch.where(mask, tgt * s, tgt)
        elif op == "zero":
            new = tgt.masked_fill(mask, 0.0)
        else:  # style
            refs = z[:, n_t:]  # [H, n_ref, T, |F|]
            ref = refs[:, torch.arange(n_t, device=z.device) % self.n_references]  # [H, n_t, T, |F|]
            if self.spec.pooled:
                # Copying token by token also copies the reference's layout and its noise estimate; matching
                # each feature's mean over the image keeps the target's layout (features absent stay absent).
                mean_t, mean_r = tgt.mean(dim=2, keepdim=True), ref.mean(dim=2, keepdim=True)  # [H, n_t, 1, |F|]
                ratio = torch.where(mean_t > 0, mean_r / mean_t.clamp_min(1e-12), torch.ones_like(mean_t))
                ref = tgt * ratio  # [H, n_t, T, |F|]
            new = tgt + mask * (s * (ref - tgt))
        return torch.cat([new, z[:, n_t:]], dim=1)  # [H, n, T, |F|]

    def _edit(self, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        halves, edited = edited_halves(self.spec.branch, self._guided)
        b, n_tok, d = output.shape  # [halves * n, T, D]
        if d != self.sae.spec.d_in:
            raise EditError(f"layer {self.layer} outputs {d} channels but the SAE expects {self.sae.spec.d_in}: "
                            "it belongs to another model")
        if self._units.shape[0] not in (1, n_tok):
            raise EditError(f"feature maps cover {self._units.shape[0]} tokens but the model has {n_tok} per image")
        n = b // halves
        h = output.float().reshape(halves, n, n_tok, d)  # [halves, n, T, D]
        with torch.no_grad():
            if self.spec.op == "add":  # z' - z does not depend on z: no need to encode
                z = h.new_zeros(edited, n, n_tok, len(self._features))  # [H, n, T, |F|]
            else:
                x = h[:edited].reshape(-1, d)  # [H*n*T, D]
                t = torch.full((x.shape[0],), self._timestep, dtype=torch.long, device=x.device)
                z = self.sae.encode(x, t)[:, self._features].reshape(edited, n, n_tok, -1)  # [H, n, T, |F|]
            dz = self.edit_latents(z) - z  # [H, n, T, |F|]; exactly 0 wherever the edit changes nothing
            delta = dz @ self._w_delta  # [H, n, T, D] = dec(z') - dec(z)
            out = h.clone()
            out[:edited] += delta
            n_t = n - self.n_references
            self.records.append(StepRecord(self._step, delta[:, :n_t].norm(dim=-1).mean(),
                                           h[:edited, :n_t].norm(dim=-1).mean()))
        return out.reshape(b, n_tok, d).to(output.dtype)
