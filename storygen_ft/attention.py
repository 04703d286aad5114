"""The added context attention, installed into a diffusers UNet through attention processors.

Every transformer block of the UNet keeps its own self- and text cross-attention. A processor on the
text cross-attention (``attn2``) sees ``norm2(h)``, the block's hidden state right after self-attention,
and serves two purposes, selected per UNet call by the :class:`StoryAttentionState` passed as
``cross_attention_kwargs={"story": state}``:

* ``record``: a reference frame's pass; the processor stores ``norm2(h)`` per layer (StoryGen collects
  the hidden state after self-attention, per layer).
* ``attend``: the current frame's pass; the processor adds a context branch beside the text attention,
  ``h <- h + attn2(norm2(h), text) + context(norm2(h), references)``.

The context branch is either StoryGen's cross-attention over the references' tokens
(:class:`ReferenceCrossAttention`) or Make-A-Story's memory attention (:class:`MemoryAttention`). Both
have zero-initialised output projections, so an untrained model reproduces its base UNet exactly.
StoryGen sums ``(attn2(.) + h) + (attn3(.) + h)``, counting ``h`` twice; we add the branch once, which
keeps that equality.

``storygen_exact`` instead reproduces StoryGen's block math, for weights imported from their checkpoint
(``storypipe import-storygen``); it records and reads the raw post-self-attention state ``h`` (not
``norm2(h)``), which a forward pre-hook on ``norm2`` hands to the processor:
``h <- (attn2(norm2(h), text) + h) + (attn3(norm4(h), references) + h)``.

The new layers live in an ``nn.ModuleDict`` outside the UNet (the processors only reference them), so
the UNet's own weights and ``save_pretrained`` output stay plain SD 1.5.
Note: ``set_default_attn_processor``, ``fuse_qkv_projections`` and xformers replace these processors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

ContextKind = Literal["storygen", "storygen_exact", "memory"]
MEMORY_INITIAL_TEMPERATURE = 10.0  # cosine-similarity logits scale at initialisation


@dataclass
class StoryAttentionState:
    """What the processors exchange during one UNet call.

    ``record``: ``features`` is filled with one ``(rows, L, C)`` tensor per layer.
    ``attend``: ``features`` holds one ``(S, N, L, C)`` tensor per layer: S *reference sets* of N
    references each. ``set_of_row[r]`` names the set query row ``r`` reads; ``None`` means row ``r``
    reads set ``r`` (training: one set per example). Rows that read the same set share its keys and
    values, which are projected once: the sampler's *image* and *all* branches read one set of real
    references, and every story's *uncond* branch the one blank set.
    ``reference_mask`` is ``(S, N)``, True where a reference exists; rows whose set has none get no
    context. ``None`` means every reference exists: no mask at all, so SDPA can pick its fused (flash /
    memory-efficient) kernels, and no device-to-host sync asks whether one is needed.
    The memory attention also needs the sentence embeddings: ``query_embedding`` ``(rows, D)`` of the
    current description and ``key_embeddings`` ``(S, N, D)`` of the references' descriptions.
    With ``keep_projections`` each layer's key/value projections of ``features`` are kept in
    ``projections`` once computed, for as long as the state lives: the sampler's fast mode keeps one
    state for the frame, so they are computed once per frame. Training leaves it off (gradient
    checkpointing reruns a block and must recompute them).
    """

    mode: Literal["record", "attend"]
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_mask: torch.Tensor | None = None
    query_embedding: torch.Tensor | None = None
    key_embeddings: torch.Tensor | None = None
    set_of_row: tuple[int, ...] | None = None
    keep_projections: bool = False
    projections: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    def projected(
        self, layer: str, project: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """``project(features[layer])``; with ``keep_projections`` computed once per layer and kept."""
        if not self.keep_projections:
            return project(self.features[layer])
        if layer not in self.projections:
            self.projections[layer] = project(self.features[layer])
        return self.projections[layer]

    def row_groups(self) -> list[RowGroup]:
        """The query rows grouped by the set they read, sets with equally many readers together."""
        if self.set_of_row is None:
            count = next(iter(self.features.values())).shape[0]
            return [RowGroup(sets=list(range(count)), rows=list(range(count)), readers=1)]
        readers: dict[int, list[int]] = {}
        for row, reference_set in enumerate(self.set_of_row):
            readers.setdefault(reference_set, []).append(row)
        groups: dict[int, RowGroup] = {}
        for reference_set, rows in readers.items():
            group = groups.setdefault(len(rows), RowGroup([], [], len(rows)))
            group.sets.append(reference_set)
            group.rows.extend(rows)  # set-major: the readers of one set side by side
        return list(groups.values())

    def rows_with_references(self) -> torch.Tensor | None:
        """``(rows,)``: True where the row's set has a reference; ``None`` when every row's does."""
        if self.reference_mask is None:
            return None
        has_reference = self.reference_mask.any(dim=1)  # (S,)
        if self.set_of_row is None:
            return has_reference
        return has_reference[list(self.set_of_row)]  # (rows,)


@dataclass
class RowGroup:
    """Query ``rows`` (set-major, ``readers`` per set) that read the reference ``sets``."""

    sets: list[int]
    rows: list[int]
    readers: int


def by_set(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """``tensor[indices]`` along dim 0, without a copy when ``indices`` is all of it in order."""
    if indices == list(range(tensor.shape[0])):
        return tensor
    return tensor[indices]


class ReferenceCrossAttention(nn.Module):
    """StoryGen's added attention (``attn3``): queries from the current frame, keys and values from the
    references' tokens of the same layer, concatenated along the token axis."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)  # the branch's own norm (StoryGen's norm4)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    @classmethod
    def from_self_attention(cls, attn1: Attention) -> ReferenceCrossAttention:
        """Start from the block's self-attention projections (as StoryGen does); the output starts at zero."""
        layer = cls(attn1.to_q.in_features, attn1.heads)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(layer, name).weight.copy_(getattr(attn1, name).weight)
        return layer

    @classmethod
    def from_block(cls, block: BasicTransformerBlock) -> ReferenceCrossAttention:
        """StoryGen's initialisation: ``attn3`` and ``norm4`` copy ``attn1`` and ``norm1``, output included
        (haoningwu3639/StoryGen, model/unet_2d_condition.py, ``load_SDM_state_dict``)."""
        attn1 = block.attn1
        layer = cls(attn1.to_q.in_features, attn1.heads)
        with torch.no_grad():
            for name in ("to_q", "to_k", "to_v"):
                getattr(layer, name).weight.copy_(getattr(attn1, name).weight)
            layer.to_out.load_state_dict(attn1.to_out[0].state_dict())
            layer.norm.load_state_dict(block.norm1.state_dict())
        return layer

    def forward(self, hidden_states: torch.Tensor, state: StoryAttentionState, layer: str) -> torch.Tensor:
        rows, length, channels = hidden_states.shape
        head_dim = channels // self.heads
        key, value = state.projected(layer, self.project_references)  # (S, N*L_ref, C) each
        query = self.to_q(self.norm(hidden_states))  # (rows, L, C)
        mask = state.reference_mask  # (S, N) or None: all there
        groups = state.row_groups()
        out = None if len(groups) == 1 and groups[0].rows == list(range(rows)) else torch.empty_like(query)
        for group in groups:
            # The readers of one set side by side along the token axis: one attention, shared keys.
            sets = len(group.sets)
            group_query = by_set(query, group.rows).reshape(sets, group.readers * length, channels)
            token_mask = None
            if mask is not None:
                set_mask = by_set(mask, group.sets)  # (S_g, N)
                token_mask = set_mask.repeat_interleave(
                    key.shape[1] // mask.shape[1], dim=1
                )  # (S_g, N*L_ref)
                token_mask = token_mask | ~set_mask.any(dim=1, keepdim=True)  # finite softmax; zeroed below
                token_mask = token_mask[:, None, None, :]  # (S_g, 1, 1, N*L_ref)
            q, k, v = (
                x.view(sets, -1, self.heads, head_dim).transpose(1, 2)
                for x in (group_query, by_set(key, group.sets), by_set(value, group.sets))
            )
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)  # (S_g, heads, g*L, d)
            attended = attended.transpose(1, 2).reshape(sets * group.readers, length, channels)
            if out is None:  # one group holding every row in order
                out = attended
            else:
                out[group.rows] = attended
        out = self.to_out(out)  # (rows, L, C)
        has_reference = state.rows_with_references()
        return out if has_reference is None else out * has_reference[:, None, None].to(out.dtype)

    def project_references(self, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, N, L_ref, C)`` -> keys and values ``(S, N*L_ref, C)``: the references' tokens concatenated."""
        sets, count, tokens, channels = references.shape
        context = references.reshape(sets, count * tokens, channels)  # (S, N*L_ref, C)
        return self.to_k(context), self.to_v(context)


class MemoryAttention(nn.Module):
    """Make-A-Story's memory attention: Q = W_Q f(S^m), K = W_K f(S^{<m}), V = W_V f(Z^{<m}).

    The current sentence weighs the previous sentences, and the output is the matching weighted sum of
    the previous frames' features at this layer, added to the cross-attention output. Keys and queries
    are compared by cosine similarity with W_Q = W_K at initialisation, so before any training the frame
    whose sentence matches the query already gets the largest weight.
    """

    def __init__(self, dim: int, text_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(text_dim, text_dim, bias=False)
        self.to_k = nn.Linear(text_dim, text_dim, bias=False)
        with torch.no_grad():
            self.to_k.weight.copy_(self.to_q.weight)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(MEMORY_INITIAL_TEMPERATURE)))
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def weights(
        self, query_embedding: torch.Tensor, key_embeddings: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention over the N references: ``(rows, D)``, ``(rows, N, D)``, ``(rows, N)`` -> ``(rows, N)``
        (a ``None`` mask: every reference exists)."""
        query = F.normalize(self.to_q(query_embedding), dim=-1)  # (rows, D)
        keys = F.normalize(self.to_k(key_embeddings), dim=-1)  # (rows, N, D)
        scores = torch.einsum("rd,rnd->rn", query, keys) * self.log_temperature.exp()  # (rows, N)
        if mask is None:
            return scores.softmax(dim=-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1) * mask.any(dim=1, keepdim=True)  # rows without references weigh nothing

    def forward(self, hidden_states: torch.Tensor, state: StoryAttentionState, layer: str) -> torch.Tensor:
        (values,) = state.projected(layer, lambda references: (self.to_v(references),))  # (S, N, L, C)
        set_of_row = list(state.set_of_row) if state.set_of_row is not None else None
        keys, mask = state.key_embeddings, state.reference_mask  # (S, N, D), (S, N)
        if set_of_row is not None:
            keys = keys[set_of_row]  # (rows, N, D)
            mask = mask[set_of_row] if mask is not None else None
        weights = self.weights(state.query_embedding, keys, mask).to(values.dtype)  # (rows, N)
        memory = torch.empty_like(hidden_states)  # (rows, L, C)
        for group in state.row_groups():
            group_weights = weights[group.rows].view(len(group.sets), group.readers, -1)  # (S_g, g, N)
            memory[group.rows] = torch.einsum(
                "sgn,snlc->sglc", group_weights, by_set(values, group.sets)
            ).flatten(0, 1)  # (S_g*g, L, C)
        return self.to_out(memory)


class StorySelfAttnProcessor(AttnProcessor2_0):
    """Plain self-attention that accepts the story state, so diffusers passes it on without warnings."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, story=None
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class StoryCrossAttnProcessor(AttnProcessor2_0):
    """Text cross-attention plus, in ``attend`` mode, the context branch; in ``record`` mode it stores
    its input (the post-self-attention state) under its layer name."""

    def __init__(self, layer: str, context: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.context = context

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, story=None
    ):
        text = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if story is None:
            return text
        if story.mode == "record":
            story.features[self.layer] = hidden_states  # (rows, L, C)
            return text
        return text + self.context(hidden_states, story, self.layer)


class StoryGenExactCrossAttnProcessor(AttnProcessor2_0):
    """StoryGen's block math on the text cross-attention (haoningwu3639/StoryGen, model/attention.py,
    ``BasicTransformerBlock.forward``): ``record`` stores the raw post-self-attention state ``h``;
    ``attend`` returns ``attn2(norm2(h)) + attn3(norm4(h), refs) + h``, so that the block's own residual
    makes it ``h_t + h_i`` with ``h`` counted twice. Rows without references get the plain block.

    ``h`` is the input of the block's ``norm2``, captured by :meth:`capture` (a forward pre-hook).
    """

    def __init__(self, layer: str, context: ReferenceCrossAttention) -> None:
        super().__init__()
        self.layer = layer
        self.context = context
        self.post_self_attention: torch.Tensor | None = None  # (rows, L, C), set per call by capture

    def capture(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on ``norm2``: keep its input, the post-self-attention state."""
        self.post_self_attention = args[0]  # (rows, L, C)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, story=None
    ):
        text = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        raw, self.post_self_attention = self.post_self_attention, None
        if story is None:
            return text
        if raw is None or raw.shape != hidden_states.shape:
            raise RuntimeError(f"{self.layer}: the post-self-attention state was not captured")
        if story.mode == "record":
            story.features[self.layer] = raw  # (rows, L, C)
            return text
        context = self.context(raw, story, self.layer)  # (rows, L, C)
        if story.reference_mask is None:  # every row has its references
            return text + context + raw
        has_reference = story.rows_with_references()[:, None, None].to(raw.dtype)  # (rows, 1, 1)
        return text + context + raw * has_reference  # (rows, L, C)


def layer_key(block_name: str) -> str:
    """ModuleDict key of a transformer block's context layer (module names may not contain dots)."""
    return block_name.replace(".", "__")


def build_context_layers(unet: nn.Module, kind: ContextKind, text_dim: int) -> nn.ModuleDict:
    """One context layer per transformer block of ``unet``, sized like the block."""
    layers = nn.ModuleDict()
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            if kind == "storygen":
                layers[layer_key(name)] = ReferenceCrossAttention.from_self_attention(module.attn1)
            elif kind == "storygen_exact":
                layers[layer_key(name)] = ReferenceCrossAttention.from_block(module)
            else:
                layers[layer_key(name)] = MemoryAttention(module.attn1.to_q.in_features, text_dim)
    if not layers:
        raise ValueError("the UNet has no transformer block with a cross-attention to extend")
    return layers


def install_story_processors(unet: nn.Module, layers: nn.ModuleDict, kind: ContextKind) -> None:
    """Put the story processors on every attention of ``unet``'s transformer blocks (for
    ``storygen_exact`` also the pre-hook on each block's ``norm2``)."""
    processors = {}
    for (
        name
    ) in unet.attn_processors:  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
        block, _, attention = name.removesuffix(".processor").rpartition(".")
        if attention == "attn2" and kind == "storygen_exact":
            transformer_block = unet.get_submodule(block)
            if transformer_block.norm_type != "layer_norm":
                raise ValueError(
                    f"{block}: storygen_exact needs layer_norm blocks, not {transformer_block.norm_type}"
                )
            processor = StoryGenExactCrossAttnProcessor(layer_key(block), layers[layer_key(block)])
            transformer_block.norm2.register_forward_pre_hook(processor.capture)
            processors[name] = processor
        elif attention == "attn2":
            processors[name] = StoryCrossAttnProcessor(layer_key(block), layers[layer_key(block)])
        else:
            processors[name] = StorySelfAttnProcessor()
    unet.set_attn_processor(processors)


def story_processors_installed(unet: nn.Module) -> bool:
    return any(
        isinstance(p, (StoryCrossAttnProcessor, StoryGenExactCrossAttnProcessor))
        for p in unet.attn_processors.values()
    )
