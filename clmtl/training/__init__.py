"""Training: the Avalanche template and its loss, the strategy-plugin surface and registry, schedules, devices,
precision, multi-process training and run checkpoints."""
