"""Serving pieces (imported as `vllm_dash.serving`): launcher, metrics, embedded model."""
