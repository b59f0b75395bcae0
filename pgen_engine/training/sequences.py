"""Teacher-forcing inputs of sampled images and their log-probs with the training numerics.

:func:`build_sequences` turns prompts + sampled codes into left-padded :class:`Sequences`;
:func:`policy_logprobs` scores them on the conditional distribution (``forward_train`` +
``image_token_logprobs``), :func:`guided_policy_logprobs` on the CFG-guided one (a second
forward on the rollout's unconditional prompts, :func:`uncond_prompts`): the same numerics
the update's loss differentiates.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from pgen_engine.generation.inputs import Prompt, uncond_ids
from pgen_engine.generation.waves import UNCOND_MODES

from .grpo import guided_log_softmax


@dataclasses.dataclass
class Sequences:
    """Left-padded teacher-forcing inputs of sampled images (see :func:`build_sequences`).

    Attributes:
        input_ids: int64 ``[N, L]`` token ids.
        gen_code_mask: bool ``[N, L]``, True where the id is an image code (history or sampled).
        attention_mask: int64 ``[N, L]``, 1 on real tokens.
        pixel_values: pixels history mode: per row, float32 ``[n_r, 3, S, S]`` history images
            filling the row's ``<image>`` placeholders; None in codes mode.
        image_features: per row, the tower's outputs ``[n_r, T_img, D_vision]`` of those images
            (a frozen tower's feature cache, or a trainable tower's features for the current
            weights), used instead of ``pixel_values`` by the no-grad passes; or None.
        items: per row, the ids of its history items (the identity :meth:`tower_history`
            de-duplicates by), or None.
    """

    input_ids: torch.Tensor
    gen_code_mask: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: list[torch.Tensor] | None = None
    image_features: list[torch.Tensor] | None = None
    items: list[list[str]] | None = None

    def rows(self, sl: slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, gen_code_mask, attention_mask) of rows ``sl`` on ``device``."""
        return self.input_ids[sl].to(device), self.gen_code_mask[sl].to(device), self.attention_mask[sl].to(device)

    def history(self, sl: slice, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixel_values ``[sum n_r, 3, S, S]``, image_features ``[sum n_r, T_img, D]``) of rows ``sl``:
        cached features when present (then pixels are None), else pixels, else (None, None)."""
        def cat(rows: list[torch.Tensor] | None) -> torch.Tensor | None:
            chosen = [p for p in (rows[sl] if rows is not None else []) if p is not None]
            return torch.cat(chosen).to(device) if chosen else None

        feats = cat(self.image_features)
        return (None, feats) if feats is not None else (cat(self.pixel_values), None)

    def tower_history(self, sl: slice, device: torch.device
                      ) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        """``(pixel_values [U, 3, S, S], None, pixel_index int64 [sum n_r])`` of rows ``sl`` for a
        pass with gradients through a trainable vision tower (:func:`policy_logprobs`
        arguments 7-9): each distinct history item of the rows once (by :attr:`items`; every
        image of a row counts as distinct when items are unknown), ``pixel_index`` mapping
        each row image, in row order, to its entry. (None, None, None) without pixels."""
        if self.pixel_values is None:
            return None, None, None
        rows = self.pixel_values[sl]
        names = self.items[sl] if self.items is not None else [None] * len(rows)
        first: dict[str, int] = {}
        picked: list[torch.Tensor] = []
        index: list[int] = []
        for r, (px, ids) in enumerate(zip(rows, names)):
            if px is None or px.shape[0] == 0:
                continue
            if ids is not None and len(ids) != px.shape[0]:
                raise ValueError(f"Sequences: row {r} has {px.shape[0]} history images but {len(ids)} item ids")
            for k in range(px.shape[0]):
                key = ids[k] if ids is not None else None
                if key is None or key not in first:
                    if key is not None:
                        first[key] = len(picked)
                    index.append(len(picked))
                    picked.append(px[k])
                else:
                    index.append(first[key])
        if not picked:
            return None, None, None
        return (torch.stack(picked).to(device), None, torch.tensor(index, dtype=torch.long, device=device))

    def __iter__(self):
        return iter((self.input_ids, self.gen_code_mask, self.attention_mask))


def row_pixels(pixel_values: Sequence[torch.Tensor] | None, group_size: int) -> list[torch.Tensor] | None:
    """Per-prompt history pixels ``[n_i,3,S,S]`` -> per-row (``r = i*G + j``) list, or None (codes mode)."""
    if pixel_values is None:
        return None
    return [pv for pv in pixel_values for _ in range(group_size)]


def build_sequences(prompts: Sequence[Sequence[int]], code_masks: Sequence[Sequence[bool]] | None,
                    tokens: torch.Tensor, group_size: int, pad_id: int,
                    pixel_values: Sequence[torch.Tensor] | None = None,
                    image_features: Sequence[torch.Tensor] | None = None,
                    history_items: Sequence[Sequence[str]] | None = None) -> Sequences:
    """Left-padded teacher-forcing inputs for sampled images.

    Row ``r = i*G + j`` is ``prompts[i] ++ tokens[r, :T-1]``; with left padding the last
    ``T`` positions of every row are exactly those predicting ``tokens[r, 0..T-1]``.

    Args:
        prompts: B id lists (each ends with begin-of-image).
        code_masks: B bool lists (history VQ codes) or None.
        tokens: int64 ``[B*G, T]``.
        group_size: G.
        pad_id: padding id.
        pixel_values: pixels history mode: B float32 ``[n_i, 3, S, S]`` (one per prompt), or None.
        image_features: B vision-tower outputs of those images (one per prompt), or None.
        history_items: B lists of the history item ids behind ``pixel_values`` (lets a
            trainable tower encode each distinct item once per micro-batch), or None.
    Returns:
        :class:`Sequences` (``[B*G, L]`` each) on ``tokens.device``.
    """
    N, T = tokens.shape
    if N != len(prompts) * group_size:
        raise ValueError(f"build_sequences: {N} token rows != {len(prompts)} prompts x group_size {group_size}")
    L = max(len(p) for p in prompts) + T - 1
    ids = torch.full((N, L), pad_id, dtype=torch.long)
    cm = torch.zeros((N, L), dtype=torch.bool)
    att = torch.zeros((N, L), dtype=torch.long)
    toks = tokens.cpu()
    for i, p in enumerate(prompts):
        S = len(p)
        row = torch.tensor(list(p), dtype=torch.long)
        pm = torch.tensor(list(code_masks[i]), dtype=torch.bool) if code_masks is not None else torch.zeros(S, dtype=torch.bool)
        for j in range(group_size):
            r = i * group_size + j
            ids[r, L - S - T + 1:L - T + 1] = row
            cm[r, L - S - T + 1:L - T + 1] = pm
            ids[r, L - T + 1:] = toks[r, :T - 1]
            cm[r, L - T + 1:] = True
            att[r, L - S - T + 1:] = 1
    dev = tokens.device
    items = None if history_items is None else [list(h) for h in history_items for _ in range(group_size)]
    return Sequences(ids.to(dev), cm.to(dev), att.to(dev), row_pixels(pixel_values, group_size),
                     row_pixels(image_features, group_size), items)


def policy_logprobs(model, input_ids: torch.Tensor, gen_code_mask: torch.Tensor, attention_mask: torch.Tensor,
                    targets: torch.Tensor, temperature: float, pixel_values: torch.Tensor | None = None,
                    image_features: torch.Tensor | None = None, pixel_index: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of ``targets`` with the training numerics.

    Args:
        model: JanusModel (the policy's module or the reference).
        input_ids, gen_code_mask, attention_mask: ``[N, L]`` from :func:`build_sequences`.
        targets: int64 ``[N, T]`` sampled codes.
        temperature: the sampling temperature (this is the conditional policy at that
            temperature: ``rl.policy_distribution: conditional``, or any run at guidance 1;
            :func:`guided_policy_logprobs` scores the CFG-guided one).
        pixel_values: pixels history mode: ``[sum n_img, 3, S, S]`` of the rows, in row order
            (the same images the rollout's prompts were built with).
        image_features: instead of ``pixel_values``: the frozen tower's cached outputs of those
            images ``[sum n_img, T_img, D_vision]`` (no re-encoding per row / epoch).
        pixel_index: with ``pixel_values`` holding each distinct image once (``[U, 3, S, S]``,
            :meth:`Sequences.tower_history`): int64 ``[sum n_img]`` picking each row image's
            entry. The tower encodes the U images once and the features are indexed, not
            detached, so gradients reach the tower summed over every use (as re-encoding per
            row would give them).
    Returns:
        (logprobs fp32 ``[N, T]``, entropy fp32 ``[N, T]``); differentiable when grad is on.
    """
    N, T = targets.shape
    if pixel_index is not None:
        if pixel_values is None or image_features is not None:
            raise ValueError("policy_logprobs: pixel_index needs pixel_values (the distinct images) and no image_features")
        image_features = model.vision_hidden(pixel_values).index_select(0, pixel_index.to(pixel_values.device))
        pixel_values = None
    x = model.embed_inputs(input_ids, gen_code_mask, pixel_values, image_features)
    h = model.forward_train(x, attention_mask)[:, -T:]
    lp, ent = model.image_token_logprobs(h.reshape(N * T, -1), targets.reshape(-1).to(h.device),
                                         temperature=temperature)
    return lp.reshape(N, T).float(), ent.reshape(N, T).float()


def uncond_prompts(prompts: Sequence[Sequence[int]], code_masks: Sequence[Sequence[bool]] | None, special,
                   mode: str) -> list[list[int]]:
    """The unconditional prompt of each prompt, exactly as the rollout's Generator builds it
    (:func:`pgen_engine.generation.inputs.uncond_ids`): ``"pad"`` keeps the length and BOS /
    begin-of-image, every other token (and every history code) becomes ``special.pad``;
    ``"short"`` is ``[bos, boi]``. No history images or codes remain.
    """
    if mode not in UNCOND_MODES:  # uncond_ids reads anything but "short" as "pad"
        raise ValueError(f"uncond_prompts: mode must be one of {UNCOND_MODES}, got {mode!r}")
    return [list(uncond_ids(Prompt(list(p), None if code_masks is None else list(code_masks[i]), 0), special, mode))
            for i, p in enumerate(prompts)]


def stack_left_padded(a: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two left-padded row sets ``(ids int64, code_mask bool, attention_mask) [N_a, L_a]`` and
    ``[N_b, L_b]`` -> one ``[N_a + N_b, max(L_a, L_b)]`` set (rows of ``a`` first), the shorter
    one left-padded further (id 0, no code, attention 0): the last positions stay aligned."""
    L = max(a[0].shape[1], b[0].shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (L - t.shape[1], 0), value=0)

    return tuple(torch.cat([pad(x), pad(y).to(x.device)]) for x, y in zip(a, b))  # type: ignore[return-value]


def guided_policy_logprobs(model, input_ids: torch.Tensor, gen_code_mask: torch.Tensor,
                           attention_mask: torch.Tensor, uncond_ids: torch.Tensor, uncond_code_mask: torch.Tensor,
                           uncond_attention_mask: torch.Tensor, targets: torch.Tensor, temperature: float,
                           guidance_scale: float, pixel_values: torch.Tensor | None = None,
                           image_features: torch.Tensor | None = None, pixel_index: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of ``targets`` under the CFG-guided distribution
    ``softmax((u + s (c - u)) / T)`` (:func:`pgen_engine.training.grpo.guided_log_softmax`).

    One differentiable forward of ``model`` over ``2N`` rows: the conditional rows
    (``input_ids``, ``gen_code_mask``, ``attention_mask`` ``[N, L]``, with the history
    ``pixel_values`` / ``image_features`` / ``pixel_index`` as in :func:`policy_logprobs`) and
    the unconditional rows (``uncond_*`` ``[N, Lu]``, from :func:`build_sequences` of
    :func:`uncond_prompts`; no history images), left-padded to one length and batched. One
    batched forward, not two: with two forwards in one graph every parameter is used twice,
    and autograd holds the first use's gradient of every weight until the second arrives (a
    full extra gradient copy: 12 GiB for Janus-Pro-7B, measured by ``pgen plan``). The
    ``[N, T, K]`` logits of both branches are materialised (the fused conditional path does
    not), so the activations are about twice the conditional pass's.

    Returns:
        (logprobs fp32 ``[N, T]``, entropy of the guided distribution fp32 ``[N, T]``, no gradient).
    """
    N, T = targets.shape
    if pixel_index is not None:
        if pixel_values is None or image_features is not None:
            raise ValueError("guided_policy_logprobs: pixel_index needs pixel_values (the distinct images) and no "
                             "image_features")
        image_features = model.vision_hidden(pixel_values).index_select(0, pixel_index.to(pixel_values.device))
        pixel_values = None
    if uncond_ids.shape[0] != N:
        raise ValueError(f"guided_policy_logprobs: {uncond_ids.shape[0]} unconditional rows for {N} targets")
    ids, cm, att = stack_left_padded((input_ids, gen_code_mask, attention_mask),
                                     (uncond_ids, uncond_code_mask, uncond_attention_mask))
    # the history images fill placeholders of the conditional rows only (they come first)
    x = model.embed_inputs(ids, cm, pixel_values, image_features)
    logits = model.image_head_logits(model.forward_train(x, att)[:, -T:])
    lsm = guided_log_softmax(logits[:N], logits[N:], guidance_scale, temperature)
    lp = lsm.gather(-1, targets.to(lsm.device).long().unsqueeze(-1)).squeeze(-1)
    # a statistic, never differentiated: computed off the graph. (A graph kept alive by an
    # un-backwarded output leaks under the ledger's saved-tensor hooks: a [N, T, K] tensor per step.)
    with torch.no_grad():
        d = lsm.detach()
        ent = -(d.exp() * d).sum(-1)
    return lp, ent
