"""Writing a model with `save_pretrained` without waking DeepSpeed.

`PreTrainedModel.save_pretrained` unwraps the model through accelerate's
`extract_model_from_parallel`, which imports `deepspeed` whenever it is installed, only to check
whether the model is a `DeepSpeedEngine`. Importing DeepSpeed runs its accelerator detection, and on
a CPU machine that prints "Setting accelerator to CPU..." in the middle of a run that never asked for
DeepSpeed (`deepspeed=none`). A model cannot be a DeepSpeed engine before DeepSpeed is imported, so
while it is not, the probe is skipped; runs with `deepspeed=zero*` have imported it and are untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def deepspeed_probe_skipped() -> Iterator[None]:
    """Inside the block, accelerate takes DeepSpeed as absent unless it is already imported."""
    if "deepspeed" in sys.modules:
        yield
        return
    import accelerate.utils.other as accelerate_other

    original = getattr(accelerate_other, "is_deepspeed_available", None)
    if original is None:  # another accelerate layout: saving still works, only the warning may show
        yield
        return
    accelerate_other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = original


def save_pretrained(model: Any, directory: Path, **kwargs: Any) -> None:
    """`model.save_pretrained(directory, **kwargs)`, without importing DeepSpeed to do it."""
    with deepspeed_probe_skipped():
        model.save_pretrained(directory, **kwargs)
