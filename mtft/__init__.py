"""mtft: config-driven multitask finetuning of causal language models with loss balancers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mtft")  # pyproject.toml is the one place the version is written
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
