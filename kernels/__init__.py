"""DASH kernels (imported as `vllm_dash.kernels`). Pure functions on tensors; no vLLM imports.

`reference` is the readable torch implementation of the whole method (the spec in code);
every Triton kernel is tested against it.
"""
