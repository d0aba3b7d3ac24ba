"""Attention and sampling kernels written in plain PyTorch, meant to run under torch.compile."""
