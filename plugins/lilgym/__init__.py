"""lilGym visual-reasoning environments, their program executor, renderer and agents."""
