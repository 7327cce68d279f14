"""The consumer's request flow: have the producer prefill, then decode."""
