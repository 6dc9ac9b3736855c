"""The trainer: time, data and checkpoints around the GRPO / SFT controllers (``vcap train``)."""
