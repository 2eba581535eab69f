"""Built-in polyrl plugins: policies, samplers and update algorithms."""
