"""Runs a compiled library on its dist folder: `engine` (weights, entry points), `backend` (here or over
TVM RPC), `kv_cache` (sequences and pages), `chat` (turns and the context window), and the text and
image front ends (`tokenizer`, `conversation`, `preprocess`, `sampling`). Imports `formats` and
`model_defs.config`, never the converter, the checks or the CLI."""
