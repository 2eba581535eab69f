"""Latent consistency models (RLCM): policy and sampler for LCM pipelines."""
