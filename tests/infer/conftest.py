import torch

# The runner's tests use tiny models: one thread is faster than two spinning on a shared machine.
torch.set_num_threads(1)
