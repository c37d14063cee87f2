"""The data a run trains and evaluates on, as one value: what the recipe builds and the evaluation reads."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from mtft.data.mixture import Mixture, TokenizedMixture


@dataclass
class Data:
    """The tokenized task mixture, with the tokenizer it was tokenized by and the model that goes with it."""

    mixture: TokenizedMixture
    tokenizer: PreTrainedTokenizerBase
    model_path: str  # resolved: the embedded model is built into the cache on first use
    conversations: Mixture | None = None  # what was tokenized, as read (`mtft data preview`, `mtft eval`)
    template: str | None = None  # the chat template's source; None: plain prompt + response

    @property
    def tasks(self) -> list[str]:
        return self.mixture.tasks
