"""Verification building blocks: accuracy/agreement, honest latency statistics, CI gates."""
