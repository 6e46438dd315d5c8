"""The token container every block passes along, and the hook points a method plugs into.

Token-reduction methods change *which tokens exist* per image. None of them hand-rolls that
bookkeeping: they call the helpers here, and the backbone stays the same for all of them.
"""

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
from torch import Tensor, nn


@dataclass
class TokenBatch:
    """Tokens of a batch of images.

    x:    [B, N, C] features, CLS first.
    ids:  [B, N] original position of each token (0 is CLS, 1 + k is patch k), so that a method can map
          kept tokens back onto the image.
    keep: [B, N] bool, or None when every token is live. Masked execution: a dropped token stays in the
          tensor, is no attention key, and receives no residual update, exactly as the official masked
          implementations compute.
    token_counts: one [B, 2] long tensor per block already run: the live tokens each image had at that
          block's attention and at its MLP. FLOP counting and the kept-token statistics read it.
    """

    x: Tensor
    ids: Tensor
    keep: Optional[Tensor] = None
    token_counts: List[Tensor] = field(default_factory=list)

    @classmethod
    def dense(cls, x: Tensor) -> "TokenBatch":
        b, n, _ = x.shape
        return cls(x=x, ids=torch.arange(n, device=x.device).expand(b, n))

    def replace(self, **changes) -> "TokenBatch":
        return replace(self, **changes)

    def num_live(self) -> Tensor:
        """[B] live tokens per image, CLS included."""
        if self.keep is None:
            return torch.full(self.x.shape[:1], self.x.shape[1], dtype=torch.long, device=self.x.device)
        return self.keep.sum(dim=1)

    def key_mask(self) -> Optional[Tensor]:
        """Boolean SDPA mask [B, 1, 1, N] (True: attend), or None when every token is live."""
        return None if self.keep is None else self.keep[:, None, None, :]

    def add_residual(self, delta: Tensor) -> "TokenBatch":
        """x + delta, with no update for dropped tokens."""
        if self.keep is not None:
            delta = delta * self.keep.unsqueeze(-1).to(delta.dtype)
        return self.replace(x=self.x + delta)

    def gather(self, index: Tensor) -> "TokenBatch":
        """Keeps the tokens at `index` [B, M] (positions in the current sequence), in that order."""
        x = self.x.gather(1, index.unsqueeze(-1).expand(-1, -1, self.x.shape[-1]))
        keep = None if self.keep is None else self.keep.gather(1, index)
        return self.replace(x=x, ids=self.ids.gather(1, index), keep=keep)

    def with_keep(self, keep: Optional[Tensor]) -> "TokenBatch":
        """Marks tokens dropped (masked execution) without moving any data."""
        if keep is not None and self.keep is not None:
            keep = keep & self.keep
        return self.replace(keep=keep)

    def counts_per_block(self) -> Tensor:
        """[B, depth, 2] live tokens at each block's attention and MLP."""
        return torch.stack(self.token_counts, dim=1)


class TokenAdapter(nn.Module):
    """What a method plugs into one block of the shared backbone. Each hook takes and returns a TokenBatch.

    `cls_attention` is the attention row of the CLS query, [B, heads, N], computed on the side from q_cls
    and K (the fused attention kernel does not expose it); a method asks for it by setting
    `needs_cls_attention`.
    """

    needs_cls_attention: bool = False

    def before_block(self, tokens: TokenBatch) -> TokenBatch:
        return tokens

    def after_attention(self, tokens: TokenBatch, cls_attention: Optional[Tensor],
                        values: Optional[Tensor]) -> TokenBatch:
        return tokens

    def after_block(self, tokens: TokenBatch) -> TokenBatch:
        return tokens
