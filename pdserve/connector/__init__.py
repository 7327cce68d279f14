"""pdserve's vLLM V1 KV connector: scheduler half, worker half, metadata."""
