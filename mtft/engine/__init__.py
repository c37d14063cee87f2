"""The engine under the loop: backends (plain/DDP, DeepSpeed), the loop itself, loss, evaluation, checkpoints."""
