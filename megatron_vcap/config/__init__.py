"""Typed configuration: YAML + dotted overrides -> validated dataclasses."""

from megatron_vcap.config.loader import ConfigError, apply_overrides, from_dict, to_dict

__all__ = ["ConfigError", "apply_overrides", "from_dict", "to_dict"]
