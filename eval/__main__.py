"""``python -m vllm_dash.eval ARGS`` = ``vllm-dash eval ARGS``."""
import sys

from vllm_dash.eval.harness import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
