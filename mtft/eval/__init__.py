"""What a model has learned: per-task loss and generation metrics (`mtft eval`), and generation itself."""
