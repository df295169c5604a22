"""The queue runner: forwarding, retries and bounces."""
