"""mobilevlm-mlc: MobileVLM compiled with Apache TVM, run from Python.

The stages, and the one direction of their imports (a package imports only those left of it):

    errors, fileio -> model_defs -> targets -> formats -> runtime -> serve -> convert -> compiler -> check -> bench -> package, cli

- `model_defs/`  the model in Relax `nn` and the quantization registry (installed as `mobilevlm_mlc.model_defs`)
- `targets/`     one build configuration per deployment target, its passes, kernels and toolchains
- `formats/`     the files the stages hand each other: dist folder, tensor cache, manifest, compiled library
- `runtime/`     runs a compiled library: engine, backends (local, RPC), KV cache, chat, tokenizer, sampling
- `serve/`       the OpenAI-compatible server over one engine: protocol, images, scheduler, metrics, app
- `convert/`     checkpoint -> dist folder (HF checkpoint reading, weight packing)
- `compiler.py`  dist folder + target -> library
- `check/`       verification: PyTorch reference, verify, synthetic checkpoints, device-kernel checks
- `bench/`       benchmarks and their comparison
"""

__version__ = "0.1.0"
