"""How `mtft eval`, `mtft generate`, `trainer.sample_interval` and `trainer.eval_at_end` generate."""

from __future__ import annotations

from dataclasses import dataclass

from mtft.core.schema import at_least, require


@dataclass
class EvalConfig:
    max_samples: int | None = None  # validation examples per task (the first N); null: all of them
    batch_size: int = 16  # prompts generated together (left-padded, KV cache)
    max_new_tokens: int = 128  # per answer, unless the task sets its own (data.tasks.NAME.max_new_tokens)
    temperature: float = 0.0  # 0: greedy decoding; > 0: sampling at this temperature
    top_p: float = 1.0  # nucleus sampling (with temperature > 0)
    seed: int = 0  # for sampling
    sample_prompts: int = 2  # validation prompts per task shown every trainer.sample_interval steps

    def __post_init__(self) -> None:
        if self.max_samples is not None:
            at_least("eval.max_samples", self.max_samples, 1)
        for key in ("batch_size", "max_new_tokens", "sample_prompts"):
            at_least(f"eval.{key}", getattr(self, key), 1)
        at_least("eval.temperature", self.temperature, 0)
        at_least("eval.seed", self.seed, 0)
        require(0 < self.top_p <= 1, "eval.top_p", "in (0, 1]", self.top_p)
