"""Throughput and memory measurement of a compiled library (`benchmark`, here or over RPC) and the
comparison of results across targets and peers (`compare`)."""
