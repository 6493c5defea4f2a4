"""`convert`: a Hugging Face MobileVLM checkpoint -> a dist folder (MLC's layout). Reads checkpoints
(`checkpoint`), packs weights (`packing`), writes through `formats`. Nothing in `runtime` imports it."""
