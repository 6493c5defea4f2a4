"""Hand-written CPU kernels, each module with the pass that swaps it in for TVM's, and the dlight-style
schedule rules of the CPU pipeline (`schedule_rules`)."""
