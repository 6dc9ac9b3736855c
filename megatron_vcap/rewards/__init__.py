"""Rewards: structured-output parser, format / think / caption scores, judges, reward service."""
