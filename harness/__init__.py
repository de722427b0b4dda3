"""fluidbench harness: CLI, config, training, checkpoints, distributed, sweeps, reports."""
