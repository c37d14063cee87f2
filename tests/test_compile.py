"""`trainer.compile=true`: the model is compiled in place (same parameter names, same logits on
packed rows), and refused where it cannot apply (DeepSpeed)."""

import pytest
import torch

from mtft.core.errors import MtftError
from mtft.engine.backend import TorchBackend
from mtft.engine.config import TrainerConfig
from mtft.recipe.validate import validate

from conftest import compose_train, tiny_lm


@pytest.mark.slow
def test_compiled_model_trains_on_packed_rows_like_the_eager_one():
    model, eager = tiny_lm("llama", 97, num_hidden_layers=1), tiny_lm("llama", 97, num_hidden_layers=1)
    eager.load_state_dict(model.state_dict())
    names = list(model.state_dict())
    backend = TorchBackend(model, TrainerConfig(compile=True), torch.device("cpu"))
    assert list(backend.module.state_dict()) == names  # checkpoints and the saved model are unchanged
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "position_ids": torch.cat([torch.arange(6), torch.arange(10)]).repeat(2, 1)}
    compiled_logits = backend.model(**inputs, use_cache=False).logits
    eager_logits = eager(**inputs, use_cache=False).logits
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)
    compiled_logits.square().mean().backward()
    eager_logits.square().mean().backward()
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6)


def test_compile_is_refused_under_deepspeed():
    cfg = compose_train(["deepspeed=zero2", "trainer.compile=true"])
    with pytest.raises(MtftError, match="trainer.compile=true applies to the plain PyTorch engine"):
        validate(cfg)
