"""Stubs generated from proto/zae_limiter/v1/ratelimit.proto by generate_stubs.py."""
