"""Speculative decoding's proposers, one file each; `configs/spec/<name>.yaml` picks one (`none` by default)."""
