"""Build tools and binary formats outside TVM's Python API: nvcc (`nvcc`), the library's import blob
(`library_bin`), ELF objects (`elf`) and CUDA fatbins (`fatbin`)."""
