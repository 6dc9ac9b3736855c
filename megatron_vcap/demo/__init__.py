"""The CPU demo, the project's main job (``vcap demo``)."""
