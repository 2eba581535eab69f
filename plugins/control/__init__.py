"""Continuous control: Gaussian policies, environment sampler, SAC, SMILING and adversarial imitation rewards."""
