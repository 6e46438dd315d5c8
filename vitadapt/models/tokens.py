"""The token container every block passes along, and the hook points a method plugs into.

Token-reduction methods change *which tokens exist* per image. None of them hand-rolls that
bookkeeping: they call the helpers here, and the backbone stays the same for all of them.
"""

from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
from torch import Tensor, nn


@dataclass
class TokenBatch:
    """Tokens of a batch of images, in one of three layouts.

    dense:  x [B, N, C], every token live (keep is None, lengths is None).
    masked: x [B, N, C] and keep [B, N] bool. A dropped token stays in the tensor, is no attention key and
            receives no residual update, exactly as the official masked implementations compute.
    packed: x [T, C], the live tokens of all images one after the other (CLS first in each), lengths [B].
            Per-token layers (norms, qkv, proj, MLP) run on live tokens only; attention pads each image to
            the longest one (`padded` / `unpadded`) and masks the padding as keys.
    ids: original position of each token (0 is CLS, 1 + k is patch k), [B, N] or [T] like x.
    token_counts: one [B, 2] long tensor per block already run: the live tokens each image had at that
          block's attention and at its MLP. FLOP counting and the kept-token statistics read it.
    num_initial: tokens per image right after the patch embedding (CLS included).
    execution: "packed" or "masked": what `select` turns a token selection into.
    frames: video frames per clip (1 for images). A space-time sequence (TimeSformer divided / joint) holds
          token 1 + n * frames + t for patch n of frame t; per-frame sequences (XViT, space only) hold one frame
          per row, the `frames` rows of a clip one after the other.
    """

    x: Tensor
    ids: Tensor
    keep: Optional[Tensor] = None
    token_counts: List[Tensor] = field(default_factory=list)
    lengths: Optional[Tensor] = None
    num_initial: int = 0
    execution: str = "packed"
    frames: int = 1
    # Packed layout: row of each live token in a [B * width] padded tensor, and width = max(lengths); uniform:
    # every image has width tokens (always at batch 1), so the packed rows are the padded layout already (and
    # flat_index is None).
    flat_index: Optional[Tensor] = field(default=None, repr=False)
    width: int = 0
    uniform: bool = False

    @classmethod
    def dense(cls, x: Tensor, execution: str = "packed", frames: int = 1) -> "TokenBatch":
        b, n, _ = x.shape
        return cls(x=x, ids=torch.arange(n, device=x.device).expand(b, n), num_initial=n, execution=execution,
                   frames=frames)

    @classmethod
    def packed_rows(cls, x: Tensor, lengths: Tensor, execution: str = "packed") -> "TokenBatch":
        """Packed tokens x [T, C] given directly, lengths[b] rows per image (ids are row positions)."""
        ids = torch.arange(x.shape[0], device=x.device)
        return cls(x=x, ids=ids, num_initial=int(lengths.max()) if lengths.numel() else 0,
                   execution=execution)._packed(x, ids, lengths)

    def replace(self, **changes) -> "TokenBatch":
        """A copy with `changes` (what dataclasses.replace returns, without its per-field __init__: blocks call this
        twice each, and at batch 1 that is 0.5% of a DeiT-S forward)."""
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            raise TypeError(f"TokenBatch has no field {sorted(unknown)}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    @property
    def is_packed(self) -> bool:
        return self.lengths is not None

    @property
    def all_live(self) -> bool:
        """Every slot of the padded layout holds a live token (dense, or packed images of equal lengths)."""
        return self.uniform if self.is_packed else self.keep is None

    @property
    def batch_size(self) -> int:
        return self.lengths.numel() if self.is_packed else self.x.shape[0]

    def num_live(self) -> Tensor:
        """[B] live tokens per image, CLS included."""
        if self.is_packed:
            return self.lengths
        if self.keep is None:
            return torch.full(self.x.shape[:1], self.x.shape[1], dtype=torch.long, device=self.x.device)
        return self.keep.sum(dim=1)

    def live_mask(self) -> Tensor:
        """[B, N] bool in the padded layout (for packed tokens: position < length)."""
        if self.is_packed:
            return torch.arange(self.width, device=self.x.device) < self.lengths[:, None]
        if self.keep is None:
            return torch.ones(self.x.shape[:2], dtype=torch.bool, device=self.x.device)
        return self.keep

    def key_mask(self) -> Optional[Tensor]:
        """Boolean SDPA mask [B, 1, 1, N] (True: attend), or None when every token is live."""
        if self.is_packed:
            return None if self.uniform else self.live_mask()[:, None, None, :]
        return None if self.keep is None else self.keep[:, None, None, :]

    def padded(self, t: Tensor) -> Tensor:
        """A per-token tensor ([T, D] or [T]) in the padded [B, N, D] layout, zeros in the padding."""
        if not self.is_packed:
            return t
        if self.uniform:  # no padding to add: a view, no copy (every image has `width` tokens)
            return t.reshape((self.batch_size, self.width) + t.shape[1:])
        out = t.new_zeros((self.batch_size * self.width,) + t.shape[1:]).index_copy_(0, self.flat_index, t)
        return out.view((self.batch_size, self.width) + t.shape[1:])

    def unpadded(self, t: Tensor) -> Tensor:
        """Inverse of `padded`: [B, N, D] -> [T, D] (identity for dense and masked tokens)."""
        if not self.is_packed:
            return t
        flat = t.reshape((self.batch_size * self.width,) + t.shape[2:])
        return flat if self.uniform else flat.index_select(0, self.flat_index)

    def cls_tokens(self) -> Tensor:
        """[B, C] the CLS token of every image."""
        if self.is_packed:
            return self.x.index_select(0, self.lengths.cumsum(0) - self.lengths)
        return self.x[:, 0]

    def add_residual(self, delta: Tensor) -> "TokenBatch":
        """x + delta, with no update for dropped tokens."""
        if self.keep is not None:
            delta = delta * self.keep.unsqueeze(-1).to(delta.dtype)
        return self.replace(x=self.x + delta)

    def drop_path(self, delta: Tensor, rate: float, training: bool) -> Tensor:
        """Stochastic depth: drops an image's whole residual update with probability `rate` (scaled by the keep
        probability, as timm's DropPath), whatever the layout; packed tokens share their image's draw."""
        if rate == 0.0 or not training:
            return delta
        keep = delta.new_empty(self.batch_size).bernoulli_(1.0 - rate).div_(1.0 - rate)
        if self.is_packed:
            keep = keep.repeat_interleave(self.lengths)
        return delta * keep.view((-1,) + (1,) * (delta.dim() - 1))

    def gather(self, index: Tensor) -> "TokenBatch":
        """Keeps the tokens at `index` [B, M] (positions in the current sequence), in that order (dense/masked)."""
        x = self.x.gather(1, index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))
        keep = None if self.keep is None else self.keep.gather(1, index)
        return self.replace(x=x, ids=self.ids.gather(1, index), keep=keep)

    def with_keep(self, keep: Optional[Tensor]) -> "TokenBatch":
        """Marks tokens dropped (masked execution) without moving any data."""
        if keep is not None and self.keep is not None:
            keep = keep & self.keep
        return self.replace(keep=keep)

    def select(self, index: Tensor, valid: Tensor) -> "TokenBatch":
        """Keeps, per image, the tokens at padded positions index[b, :] where valid[b, :], in that order.

        A different number of tokens per image: packed execution moves the kept tokens together (later
        blocks compute on them only); masked execution marks the others dropped and moves nothing.
        """
        if self.execution == "masked" and not self.is_packed:
            keep = torch.zeros_like(self.live_mask()).scatter(1, index, valid)
            return self.with_keep(keep & self.live_mask())
        # Padded position p of image b is row first_row[b] + p of x flattened (packed: image b's rows start at
        # the sum of the earlier lengths), so one index_select moves the kept tokens, without padding first.
        if self.batch_size == 1:
            rows = index[valid]
        else:
            if self.is_packed and not self.uniform:
                first_row = self.lengths.cumsum(0) - self.lengths
            else:
                width = self.width if self.is_packed else self.x.shape[1]
                first_row = torch.arange(0, self.batch_size * width, width, device=self.x.device)
            rows = (index + first_row[:, None])[valid]
        x, ids = self.x.reshape(-1, self.x.shape[-1]), self.ids.reshape(-1)
        return self._packed(x.index_select(0, rows), ids.index_select(0, rows), valid.sum(dim=1))

    def rows(self, with_image: bool = True):
        """Every token slot as a row: (x [R, C], ids [R], image [R], live [R] bool or None for all live), with
        R = T for packed tokens and B * N otherwise. Per-token state kept per (image, id) indexes with these.
        with_image False: image is None (not computed)."""
        if self.is_packed:
            return self.x, self.ids, self.image_of_rows() if with_image else None, None
        b, n, c = self.x.shape
        image = torch.arange(b, device=self.x.device)[:, None].expand(b, n).reshape(-1) if with_image else None
        return self.x.reshape(b * n, c), self.ids.reshape(-1), image, None if self.keep is None else self.keep.reshape(-1)

    def filter(self, keep_rows: Tensor) -> "TokenBatch":
        """Keeps the live tokens whose row (in `rows` order) is True, in their order: packed execution moves them
        together, masked execution marks the others dropped."""
        if self.execution == "masked" and not self.is_packed:
            return self.with_keep(keep_rows.view(self.x.shape[:2]) & self.live_mask())
        x, ids, _, live = self.rows(with_image=False)
        if live is not None:
            keep_rows = keep_rows & live
        kept = keep_rows.nonzero().squeeze(1)  # one nonzero for every gather below
        if self.is_packed and not self.uniform:  # images of unequal lengths: count the kept rows per image
            lengths = torch.bincount(self.image_of_rows().index_select(0, kept), minlength=self.batch_size)
        else:  # every image has the same number of rows, one image after the other
            lengths = keep_rows.view(self.batch_size, -1).sum(dim=1)
        return self._packed(x.index_select(0, kept), ids.index_select(0, kept), lengths)

    def packed_live(self) -> "TokenBatch":
        """The live tokens of a dense or masked batch packed together, in their order: per-token layers then run
        on them only (a layout that must keep every token in place, such as TimeSformer's divided space-time grid,
        packs around each sub-layer and writes the result back with `into_grid`)."""
        return self.replace(execution="packed").filter(self.live_mask().reshape(-1))

    def into_grid(self, grid: "TokenBatch") -> "TokenBatch":
        """This batch's live tokens written into `grid` (dense or masked, [B, N, C], the same images) at their ids,
        which are positions in the grid's rows: they are its live tokens, every other slot is dropped and keeps
        what it held."""
        x, ids, image, live = self.rows()
        if live is not None:
            x, ids, image = x[live], ids[live], image[live]
        keep = torch.zeros(grid.x.shape[:2], dtype=torch.bool, device=x.device).index_put_((image, ids),
                                                                                          torch.ones_like(ids, dtype=torch.bool))
        return grid.replace(x=grid.x.index_put((image, ids), x), keep=keep)

    def grid_layout(self, t: Tensor, width: int, dim: int = 1) -> Tensor:
        """A per-token tensor in the padded layout (token axis `dim`) moved to grid positions (ids) of rows of
        `width` slots, zeros elsewhere: the inverse of reading a grid through `packed_live`."""
        if not self.is_packed:
            return t
        t = t.movedim(dim, 1)
        ids, live = self.padded(self.ids), self.live_mask()
        out = t.new_zeros(t.shape[0], width, *t.shape[2:])
        image = torch.arange(t.shape[0], device=t.device)[:, None].expand_as(ids)
        out[image[live], ids[live]] = t[live]
        return out.movedim(1, dim)

    def image_of_rows(self) -> Tensor:
        """[T] the image of every packed token."""
        if self.uniform:
            return torch.div(torch.arange(self.x.shape[0], device=self.x.device), self.width, rounding_mode="floor")
        return torch.div(self.flat_index, self.width, rounding_mode="floor")

    def _packed(self, x: Tensor, ids: Tensor, lengths: Tensor) -> "TokenBatch":
        """This batch with the packed tokens x [T, C] (lengths[b] of image b, one image after the other)."""
        if lengths.numel() > 1:
            shortest, width = torch.stack(torch.aminmax(lengths)).tolist()
        else:  # one image (or none): one host read, not three operators
            shortest = width = int(lengths) if lengths.numel() else 0
        uniform = shortest == width
        flat_index = None
        if not uniform:  # equal lengths need no padding, hence no padded rows
            slots = torch.arange(width, device=x.device)
            flat_index = (torch.arange(lengths.numel(), device=x.device)[:, None] * width + slots)[slots < lengths[:, None]]
        return self.replace(x=x, ids=ids, keep=None, lengths=lengths, flat_index=flat_index, width=width,
                            uniform=uniform)

    def image_slices(self) -> List[slice]:
        """The rows of each image of a packed batch, as slices of x."""
        ends = self.lengths.cumsum(0).tolist()
        return [slice(start, end) for start, end in zip([0] + ends[:-1], ends)]

    def counts_per_block(self) -> Tensor:
        """[B, depth, 2] live tokens at each block's attention and MLP."""
        return torch.stack(self.token_counts, dim=1)


_FIELD_NAMES = frozenset(f.name for f in fields(TokenBatch))


class TokenAdapter(nn.Module):
    """What a method plugs into one block of the shared backbone: before the block, inside attention (the
    per-head outputs), between attention and MLP, after the block. The model-level head hook is
    VisionTransformer.forward_head.

    `cls_attention` is the attention row of the CLS query, [B, heads, N]: row 0 of the attention matrix where
    attention runs explicitly, else computed on the side from q_cls and K (the fused attention kernel does not
    expose it; Attention.cls_row_on_side says which, for the MAC count); a method asks for it by setting
    `needs_cls_attention`.
    """

    needs_cls_attention: bool = False
    # Set to receive the keys and values of every attention call (`observe_attention`).
    observes_attention: bool = False
    # Set to receive the pre-softmax attention logits (`observe_attention_logits`); attention is then explicit.
    records_attention_logits: bool = False
    # Where TimeSformer's divided block calls after_attention: "frame" (each frame's sequence, its CLS copy
    # deciding) or "clip" (all N * T tokens of the clip, the frame-averaged CLS attention deciding).
    video_scope: str = "frame"

    def before_block(self, tokens: TokenBatch) -> TokenBatch:
        return tokens

    def attention_heads(self, tokens: TokenBatch, heads: Tensor) -> Tensor:
        """Inside attention: the per-head outputs [B, heads, N, head_dim] (padded layout) before they are merged."""
        return heads

    def observe_attention(self, tokens: TokenBatch, keys: Tensor, values: Tensor, key_mask: Optional[Tensor]) -> None:
        """Inside attention: keys and values [B, heads, N, head_dim] (padded layout) and the key mask given to
        attention ([B, 1, 1, N] bool or None), for a method that runs extra queries over the same keys."""

    def attention_bias(self, tokens: TokenBatch) -> Optional[Tensor]:
        """An additive bias for the attention logits before the softmax, [B, heads, N, N] (padded layout), or None."""
        return None

    def observe_attention_logits(self, logits: Tensor) -> None:
        """The scaled, bias-included attention logits [B, heads, N, N], when `records_attention_logits` is set."""

    def mlp_input(self, tokens: TokenBatch) -> Tensor:
        """What the block's norm2 and MLP read (its residual stays tokens.x): extra channels may be appended."""
        return tokens.x

    def after_attention(self, tokens: TokenBatch, cls_attention: Optional[Tensor],
                        values: Optional[Tensor]) -> TokenBatch:
        return tokens

    def after_block(self, tokens: TokenBatch) -> TokenBatch:
        return tokens
