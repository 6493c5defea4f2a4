"""Verification: the PyTorch reference (`reference`), the boundary-by-boundary `verify`, random-weight
checkpoints in the official layout (`synthetic`), and device kernels run on PoCL against the CPU build
(`kernel_check`). May import every stage; only `bench`, `package` and the CLI import it."""
