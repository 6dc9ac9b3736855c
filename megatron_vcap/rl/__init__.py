"""GRPO and SFT: typed records, advantages, losses, the controller and the trainer."""
