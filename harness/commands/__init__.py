"""CLI command modules; each exposes register(app). Heavy imports stay inside the command functions."""
