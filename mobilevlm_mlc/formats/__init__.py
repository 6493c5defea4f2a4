"""The files the stages hand each other: the dist folder (`dist`), its weights (`tensor_cache`), its
manifest (`manifest`), and the compiled library (`library`). Imports `model_defs` and `targets.toolchain`
only; every stage after it reads and writes through here."""
