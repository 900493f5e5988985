import os
import sys
from pathlib import Path

# Triton decides at import time whether its kernels run in the interpreter, so the switch must be
# set before any test module imports a kernel: on a machine without a GPU, every kernel is
# interpreted on the CPU.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# Tests import the project from the checkout whether or not it is pip-installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
