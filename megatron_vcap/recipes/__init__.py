"""Shipped YAML recipes (package data), e.g. the CPU demo config."""
