"""GRPO and SFT: typed records, advantages, losses, the train engine and the controllers."""
