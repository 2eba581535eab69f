"""Shared test settings."""

import torch

# The test models are tiny: one thread avoids thread start-up and contention costs that dominate
# their small matrix products (subprocess-based tests keep PyTorch's default).
torch.set_num_threads(1)
