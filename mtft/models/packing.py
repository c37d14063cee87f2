"""Whether a model keeps packed examples apart (`data.packing`), checked once before training."""

from __future__ import annotations

import torch

from mtft.core.errors import MtftError


@torch.no_grad()
def check_packed_attention(model: torch.nn.Module) -> None:
    """Two short examples in one row, told apart by their position ids alone: changing the first
    must leave the second's logits unchanged. transformers builds such block-causal attention for
    the architectures whose masks come from its `masking_utils` (sdpa, eager, flash-attention-2);
    any other would silently attend across examples, so it is refused here."""
    embeddings = model.get_input_embeddings()
    vocab, device = embeddings.weight.shape[0], embeddings.weight.device
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(vocab, (5,), generator=g), torch.randint(vocab, (4,), generator=g)
    position_ids = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)

    def second_logits(head: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([head, second])[None].to(device)
        return model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0, 5:].float()

    was_training = model.training
    model.eval()
    try:
        apart = torch.allclose(second_logits(first), second_logits((first + 1) % vocab), rtol=1e-3, atol=1e-3)
    finally:
        model.train(was_training)
    if not apart:
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise MtftError(
            f"data.packing=true, but {type(model).__name__} (attention {attention}) lets packed examples "
            "attend to each other: its transformers implementation does not build per-example masks "
            "from position ids; set data.packing=false (or data.group_by_length=true)"
        )
