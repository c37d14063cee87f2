"""Starting a job: the Hydra app behind `mtft train`, worker processes, and joining the process group."""
