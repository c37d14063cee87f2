"""mtft: config-driven multitask finetuning of causal language models with loss balancers."""

__version__ = "0.1.0"
