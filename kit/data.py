"""Token blocks for training and evaluation, and which rows of a global batch a rank takes.

Documents are tokenised, joined with the EOS token between them and cut into blocks of
``seq_len`` tokens (the remainder is dropped; a text shorter than one block is one short
block). The batch of step ``s`` is a fixed function of the seed and ``s``: the blocks in a
seeded permutation per epoch, ``batch_size`` at a time. A rank takes rows ``rank::world`` of
it, so one process and several see the same global batch and compute the same update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from kit.errors import KitError

__all__ = ["batch_rows", "global_batch", "tokenize_blocks"]


def tokenize_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int
) -> torch.Tensor:
    """``[n_blocks, seq_len]`` token ids of ``texts`` (long)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KitError("the tokenizer has no EOS token")
    ids: list[int] = []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for row in encoded:
        ids.extend(int(i) for i in row)
        ids.append(int(eos))
    n = len(ids) // seq_len
    if n == 0:
        raise KitError(f"the data holds {len(ids)} tokens, fewer than one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def global_batch(n_blocks: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Block indices of the global batch of ``step`` (0-based)."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n_blocks)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_blocks, generator=gen).tolist()
        out.extend(perm[offset : offset + batch_size - len(out)])
    return out


def batch_rows(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's rows of a global batch."""
    if len(indices) % world:
        raise KitError(f"the global batch ({len(indices)}) must be a multiple of {world} ranks")
    return indices[rank::world]
