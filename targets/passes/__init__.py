"""Relax and TIR passes the target pipelines share, one per module (as MLC's `compiler_pass/`)."""
