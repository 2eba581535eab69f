"""lilGym's four tasks as gymnasium environments.

``LilGymEnv(task, split)`` with ``task`` one of ``TowerScratch``, ``TowerFlipIt``,
``ScatterScratch``, ``ScatterFlipIt``:

* **Episode start** (``reset(seed=, options=)``): an example (statement, program, start world)
  drawn from the split with the environment's seeded generator, or the one named by
  ``options={"example_id": ...}``. Scratch starts from three empty boxes with target ``True``;
  FlipIt starts from an NLVR world with the negation of its label as the target.
* **Observation**: ``{"image": uint8 [50, 190, 3]`` (the 380x100 rendering pooled 2x2),
  ``"sentence": str, "target": 0 or 1}`` (``target`` is 1 for Scratch).
* **Actions**: ``Discrete(13)`` (Tower) or ``Discrete(2661)`` (Scatter), see :mod:`.actions`;
  ``info["action_mask"]`` (int8, 1 = valid) comes with every observation.
* **Reward** (the program is run on the world *before* the action): STOP gives +1 if the
  program's value equals the target and -1 otherwise, and ends the episode (``terminated``); any
  other action gives -0.1. An invalid action gives -1 and truncates the episode. The episode is
  truncated after ``horizon`` (11) steps. With ``stop_forcing`` (for training), a non-STOP action
  taken while the program already has the target value is turned into STOP (+1).
* ``info`` at the end of an episode has ``success`` (reward > 0) and ``success_no_sf`` (success
  not due to stop forcing).
* ``remove_rule``: lilGym's rule set for scatter REMOVE, ``"lilgym-2023"`` (default, the paper's) or
  ``"lilgym-2024"`` (see :mod:`.actions`); tower tasks do not depend on it.
* ``render()``: ``rgb_array`` gives the full 100x380 image, ``ansi`` the world in words.
"""

from __future__ import annotations

import os
import string
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from . import actions as A
from .data import TASKS, Example, examples_from_mapping, load_examples
from .executor import ProgramError, compile_program
from .render import IMAGE_HEIGHT, IMAGE_WIDTH, OBS_HEIGHT, OBS_WIDTH, describe_world, observe
from .world import World

__all__ = ["LilGymEnv", "SENTENCE_CHARSET", "MAX_SENTENCE_LENGTH", "HORIZON", "STEP_PENALTY"]

from .registration import HORIZON, register_envs  # noqa: E402 - lilGym's episode horizon
STEP_PENALTY = 0.1
"""Reward -0.1 for every action other than STOP."""
MAX_SENTENCE_LENGTH = 320
"""Longest sentence the observation space accepts (NLVR sentences are at most about 120 characters)."""
SENTENCE_CHARSET = "".join(sorted(set(string.ascii_letters + string.digits + string.punctuation + " ")))
"""Printable ASCII: every NLVR sentence is written in it."""


class LilGymEnv(gym.Env):
    """One lilGym task on one split (see the module documentation)."""

    metadata = {"render_modes": ["rgb_array", "ansi"], "render_fps": 2}

    def __init__(
        self,
        task: str = "TowerScratch",
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        data: dict[str, Any] | Sequence[Example] | None = None,
        stop_forcing: bool = False,
        horizon: int = HORIZON,
        render_mode: str | None = None,
        remove_rule: str = A.DEFAULT_REMOVE_RULE,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not accepted; choose one of {list(TASKS)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode {render_mode!r} is not accepted; choose one of {self.metadata['render_modes']}")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        A.check_remove_rule(remove_rule)
        self.remove_rule = remove_rule
        self.task, self.split = task, split
        self.appearance, self.start = TASKS[task]
        if data is None:
            self.examples = load_examples(self.appearance, self.start, split, data_dir)
        elif isinstance(data, dict):
            self.examples = examples_from_mapping(data, self.start, f"{task} data")
        else:
            self.examples = list(data)
        if not self.examples:
            raise ValueError(f"{task}: no examples")
        self._by_id = {ex.id: i for i, ex in enumerate(self.examples)}
        charset = frozenset(SENTENCE_CHARSET)
        for ex in self.examples:
            if len(ex.sentence) > MAX_SENTENCE_LENGTH or not charset.issuperset(ex.sentence):
                raise ValueError(f"{task} example {ex.id!r}: sentence outside the observation space "
                                 f"(printable ASCII, at most {MAX_SENTENCE_LENGTH} characters): {ex.sentence!r}")
        self.stop_forcing = stop_forcing
        self.horizon = horizon
        self.render_mode = render_mode
        self.n_actions = A.NUM_ACTIONS[self.appearance]
        self.action_space = spaces.Discrete(self.n_actions)
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (OBS_HEIGHT, OBS_WIDTH, 3), dtype=np.uint8),
                "sentence": spaces.Text(max_length=MAX_SENTENCE_LENGTH, min_length=1, charset=SENTENCE_CHARSET),
                "target": spaces.Discrete(2),
            }
        )
        self.example: Example | None = None
        self.world: list[list[dict[str, Any]]] = [[], [], []]
        self.t = 0
        self._image = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH, 3), dtype=np.uint8)
        self._obs_image = np.zeros((OBS_HEIGHT, OBS_WIDTH, 3), dtype=np.uint8)
        self._mask = np.zeros(self.n_actions, dtype=bool)
        self._value: bool | None = None

    # ------------------------------------------------------------------ helpers
    def program_value(self, world: list | None = None) -> bool | None:
        """The statement's program on ``world`` (default: the current one); ``None`` if it fails."""
        assert self.example is not None, "call reset() first"
        try:
            return compile_program(self.example.program).evaluate(World(self.world if world is None else world))
        except ProgramError:
            return None

    def _refresh(self) -> None:
        self._image, self._obs_image = observe(self.world)
        self._mask = A.valid_mask(self.appearance, self.world, self.remove_rule)
        self._value = self.program_value()

    def _obs(self) -> dict[str, Any]:
        assert self.example is not None
        target = 1 if self.start == "scratch" else int(self.example.target)
        return {"image": self._obs_image.copy(), "sentence": self.example.sentence, "target": target}

    def _info(self) -> dict[str, Any]:
        assert self.example is not None
        return {
            "action_mask": self._mask.astype(np.int8),
            "example_id": self.example.id,
            "target": self.example.target,
            "program_value": self._value,
            "t": self.t,
        }

    @property
    def action_mask(self) -> np.ndarray:
        """``[n_actions]`` bool: the valid actions now."""
        return self._mask.copy()

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"example_id", "example_index"}
        if unknown:
            raise ValueError(f"reset options {sorted(unknown)} are not accepted; accepted: ['example_id', 'example_index']")
        if "example_id" in options:
            key = str(options["example_id"])
            if key not in self._by_id:
                raise ValueError(f"example_id {key!r} is not in {self.task}/{self.split} ({len(self.examples)} examples)")
            index = self._by_id[key]
        elif "example_index" in options:
            index = int(options["example_index"])
            if not 0 <= index < len(self.examples):
                raise ValueError(f"example_index {index} out of range 0..{len(self.examples) - 1}")
        else:
            index = int(self.np_random.integers(len(self.examples)))
        self.example = self.examples[index]
        self.world = self.example.world_copy()
        self.t = 0
        self._refresh()
        return self._obs(), self._info()

    def step(self, action: Any):
        if self.example is None:
            raise RuntimeError("call reset() before step()")
        if isinstance(action, np.ndarray) and action.shape == ():
            action = action.item()
        if isinstance(action, bool) or not isinstance(action, (int, np.integer)) or not 0 <= int(action) < self.n_actions:
            raise ValueError(f"action {action!r} is not in Discrete({self.n_actions})")
        action = int(action)
        self.t += 1
        kind = A.decode(self.appearance, action).kind
        value, target = self._value, self.example.target
        if kind == "stop":
            reward = 1.0 if value == target else -1.0
        else:
            reward = -STEP_PENALTY
        force_stop = False
        if self.stop_forcing and kind != "stop" and value == target:
            force_stop, kind, action, reward = True, "stop", 0, 1.0
        truncated = self.t >= self.horizon
        invalid = not self._mask[action]
        if invalid:
            truncated, reward = True, -1.0
        terminated = kind == "stop"
        if not terminated and not truncated:
            self.world = A.apply(self.appearance, self.world, action, self.remove_rule)
            self._refresh()
        info = self._info()
        info.update(force_stop=force_stop, invalid=invalid)
        if terminated or truncated:
            info["success"] = reward > 0
            info["success_no_sf"] = reward > 0 and not force_stop
        return self._obs(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return self._image.copy()
        if self.render_mode == "ansi":
            assert self.example is not None
            return f"{self.example.sentence}\ntarget: {str(self.example.target).lower()}\n{self.describe()}\n"
        return None

    def render_full(self) -> np.ndarray:
        """The full 100x380 RGB image of the current world (whatever the render mode)."""
        return self._image.copy()

    def describe(self) -> str:
        """The sentence, the target and the world in words (what the language-model agent reads)."""
        assert self.example is not None
        return describe_world(self.world, tower=self.appearance == "tower")


register_envs()  # the ids resolve to this module, which is imported with gymnasium
