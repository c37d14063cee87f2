"""Sinks for a run's metrics: metrics.jsonl and the console always, W&B and TensorBoard when enabled.

Every sink gets the same rows (the metrics.jsonl rows, `base.Row`), so the trainer never knows which
loggers run; dashboard sinks live on rank 0 only, like a user would expect from one run.
"""
