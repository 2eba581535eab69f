"""Registers polyrl's lilGym environments with gymnasium (entry point ``gymnasium.envs``)."""


def register_envs() -> None:
    """Called by gymnasium when it loads environment plugins."""
