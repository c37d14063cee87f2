"""Data pipeline: tasks -> mixture -> task-aware sampler -> collator (input_ids, labels, task_ids)."""
