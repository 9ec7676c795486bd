"""vllm_dash.eval: the accuracy harness (`vllm-dash eval`, `eval-report`, `calibrate`).

  tasks       offline long-context tasks (passkey, RULER-style needles, variable tracking)
  methods     the compared methods (dense, top-k, DASH settings) and per-layer calibration
  engine      the engine child: one vLLM engine answers every method's prompts
  harness     `vllm-dash eval`: samples, engines, scoring, the report
  calibrate   `vllm-dash calibrate`: a per-layer score_scale file for a target density
  report      `vllm-dash eval-report`: DASH vs top-k at equal density, the report and plot
  targets     the default rule (selector, then summary kind; attn_pool apart), issue-13 targets
  text        natural text (stdlib docstrings) split into disjoint distill / recall slices
  capture     post-RoPE queries and keys of any Hugging Face model (AttentionInterface)
  distill     `vllm-dash distill`: learned pooling vectors (summary_file) on the frozen model
  recall      attention recall of every method and its oracle on held-out natural text
  provenance  versions and commit recorded in result files

``python -m vllm_dash.eval`` is ``vllm-dash eval``. Installed from the repository's top-level
eval/ folder (a top-level import name would be too generic; see pyproject.toml).
"""
