"""`mobilevlm-mlc serve`: an OpenAI-compatible chat-completions server (FastAPI + uvicorn) over one engine:
`protocol` (the request schema and OpenAI's error objects), `images` (image parts, with limits),
`scheduler` (continuous batching on the paged KV cache), `metrics` (Prometheus), `app` (the routes)."""
