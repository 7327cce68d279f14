"""The consumer's HTTP side, in front of its vLLM: where a prompt is prefilled,
asking producers, and handing their leases and first tokens to its engine."""
