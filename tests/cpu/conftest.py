"""CPU test configuration: Triton kernels run under the interpreter on CPU tensors."""
import os

# Must be set before triton is imported anywhere in the test process.
os.environ.setdefault("TRITON_INTERPRET", "1")
