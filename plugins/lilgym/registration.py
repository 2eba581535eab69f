"""Registers polyrl's lilGym environments with gymnasium.

``register_envs()`` adds ``polyrl/TowerScratch-v0``, ``polyrl/TowerFlipIt-v0``,
``polyrl/ScatterScratch-v0`` and ``polyrl/ScatterFlipIt-v0``. It runs when
``polyrl.plugins.lilgym`` is imported, and is also declared as a ``gymnasium.envs`` entry point
(which gymnasium releases before 1.0 load by themselves). With gymnasium >= 1.0, name the module in
the id so that ``make`` imports it in a fresh process::

    import gymnasium
    env = gymnasium.make("polyrl.plugins.lilgym:polyrl/TowerScratch-v0", split="dev")

Keyword arguments of ``make`` go to :class:`polyrl.plugins.lilgym.env.LilGymEnv` (``split``,
``data_dir``, ``data``, ``stop_forcing``, ``horizon``, ``render_mode``).
"""

from __future__ import annotations

TASK_NAMES = ("TowerScratch", "TowerFlipIt", "ScatterScratch", "ScatterFlipIt")
HORIZON = 11
"""lilGym's episode horizon (here, so that the samplers' configs read it without importing gymnasium)."""
ENV_IDS = tuple(f"polyrl/{name}-v0" for name in TASK_NAMES)


def register_envs() -> None:
    """Register the four tasks (idempotent)."""
    import gymnasium

    for name, env_id in zip(TASK_NAMES, ENV_IDS):
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=env_id,
            entry_point="polyrl.plugins.lilgym.env:LilGymEnv",
            kwargs={"task": name},
        )
