"""Image rewards: LAION aesthetic predictor and CLIP score."""
