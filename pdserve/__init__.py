"""pdserve: prefill/decode disaggregated serving on top of vLLM."""

__version__ = "0.1.0"

# The wire protocol changes independently of the package version; peers with
# different protocol versions refuse each other at handshake (the rank
# handshake and /pdserve/metadata). Every version, with what changed (a test
# checks that none is missing):
# 1: length-prefixed msgpack frames: rank info (versions, model, TP rank,
#    layers, transports), reads of a lease's blocks answered by raw payloads,
#    releases; GPU-direct transports (ipc, nccl) opened per session with
#    TransportHello / TransportWelcome; rank info tells device and host.
# 2: the server greets every connection (ServerHello, optional KV secret);
#    rank info tells the KV cache dtype.
# 3: typed leases with producer epochs; reads carry the prompt hash;
#    releases are one-way; reads are answered in order on one connection.
#    Later within 3: rank info tells the KV layout (backend, kernel blocks,
#    page bytes) and the PCI bus id, a transport hello the consumer's id; a
#    read reply may say its session was lost; a lease names where its
#    producer is reached (kv_host, set by the consumer).
# 4: ranks of different TP sizes: a read may name a run of KV heads, a
#    release how many consumer ranks must release; rank info tells each
#    layer's head dim and the model's KV heads. Later within 4: rank info
#    tells the model identity (revision, quantization, RoPE, tokenizer...);
#    the prompt hash covers the LoRA adapter; a prefill answered without a
#    lease says why (pdserve_refused); a lease carries the first token (with
#    its logprobs row) and when it was issued and handed on.
# 5: with a KV secret the producer proves it too (both nonces, AuthProof /
#    ServerProof) and every later frame, a tcp payload included (PayloadEnd),
#    carries a tag under per-direction keys; a release names its consumer
#    rank (counted once). Later within 5: /pdserve/metadata tells the
#    serving identity (chat template, LoRA adapters, parsers).
# 6: the producer instance is ``instance_id`` in rank info and leases (was
#    ``epoch``), the name /pdserve/metadata gives it.
PROTOCOL_VERSION = 6
