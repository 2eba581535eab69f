"""``gaussian``: a diagonal Gaussian MLP policy for continuous control, optionally tanh-squashed,
optionally with a value head (for actor-critic updates such as PPO).

The network maps an observation to the mean ``mu`` and log standard deviation of a Gaussian over
the *raw* action ``u``. With ``squash`` (SAC's parameterisation) the action is ``a = tanh(u)`` and

    log pi(a|s) = sum_i [ log N(u_i; mu_i, sigma_i) - log(1 - tanh(u_i)^2) ],

otherwise ``a = u``. The policy's action ``a`` lives in ``[-1, 1]`` and is mapped affinely onto
the environment's action bounds (and, unsquashed, clipped to them). Rollouts record ``u`` as
``data["raw_actions"]`` so that log-probs are recomputed exactly; actions without a recorded
``u`` (demonstrations) are mapped back with ``atanh`` after clipping to ``1 - 1e-5``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polyrl.types import ConfigError, Policy, Rollout

from .envs import env_info
from .nets import ACTIVATIONS, mlp

LOG_2PI = math.log(2 * math.pi)
ATANH_CLIP = 1 - 1e-5


@dataclass
class GaussianPolicyConfig:
    """Settings of the Gaussian MLP policy."""

    env: str = "Pendulum-v1"
    """Gymnasium environment id; the observation size, action size and action bounds are read from it."""
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden layer widths of the policy MLP (SMILING's SAC: 1024, 1024; scaled down for CPU)."""
    activation: Literal["relu", "tanh", "elu", "leaky_relu", "silu"] = "relu"
    """Hidden-layer nonlinearity."""
    squash: bool = True
    """Squash actions with tanh (SAC). False: a plain Gaussian clipped to the bounds (PPO's usual choice)."""
    std: Literal["state", "parameter"] = "state"
    """``state``: the network outputs the log-std (SAC); ``parameter``: one learned log-std per action
    dimension, independent of the state (PPO's usual choice)."""
    log_std_min: float = -5.0
    """Lower bound of the log standard deviation."""
    log_std_max: float = 2.0
    """Upper bound of the log standard deviation."""
    init_log_std: float = 0.0
    """Initial log standard deviation when ``std: parameter``."""
    value_head: bool = False
    """Add a state-value MLP (``forward(..., with_values=True)``), for actor-critic updates such as ppo."""
    value_hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])
    """Hidden layer widths of the value MLP."""

    def check(self) -> None:
        if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(f"policy.hidden_sizes must be a non-empty list of positive widths, got {self.hidden_sizes}")
        if self.value_head and (not self.value_hidden_sizes or any(h < 1 for h in self.value_hidden_sizes)):
            raise ConfigError(f"policy.value_hidden_sizes must be positive widths, got {self.value_hidden_sizes}")
        if self.log_std_min >= self.log_std_max:
            raise ConfigError(f"policy.log_std_min ({self.log_std_min}) must be < policy.log_std_max ({self.log_std_max})")
        env_info(self.env)  # unknown or unsupported environments fail here, before anything is built


class GaussianPolicy(Policy):
    """Diagonal Gaussian MLP policy over a gymnasium ``Box`` action space (see the module docs)."""

    modality = "env"

    def __init__(self, cfg: GaussianPolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        info = env_info(cfg.env)
        self.env_id = info.env_id
        self.obs_dim, self.action_dim = info.obs_dim, info.action_dim
        self.register_buffer("action_low", torch.tensor(info.action_low), persistent=False)
        self.register_buffer("action_high", torch.tensor(info.action_high), persistent=False)
        a = self.action_dim
        out = 2 * a if cfg.std == "state" else a
        self.net = mlp(self.obs_dim, cfg.hidden_sizes, out, cfg.activation)
        if cfg.std == "parameter":
            self.log_std = nn.Parameter(torch.full((a,), float(cfg.init_log_std)))
        self.has_value_head = bool(cfg.value_head)
        if cfg.value_head:
            self.value = mlp(self.obs_dim, cfg.value_hidden_sizes, 1, cfg.activation)

    # ------------------------------------------------------------------ distribution
    def dist_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of the raw action, each ``[..., A]``."""
        h = self.net(obs)
        lo, hi = self.cfg.log_std_min, self.cfg.log_std_max
        if self.cfg.std == "state":
            mean, raw = h.chunk(2, dim=-1)
            log_std = lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1)
        else:
            mean = h
            log_std = self.log_std.clamp(lo, hi).expand_as(mean)
        return mean, log_std

    def log_prob_raw(self, mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``log pi(a|s)`` summed over action dimensions, for raw actions ``u`` (``[...]``)."""
        z = (u - mean) * torch.exp(-log_std)
        logp = (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)
        if self.cfg.squash:  # log|d tanh(u)/du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
            logp = logp - (2 * (math.log(2.0) - u - F.softplus(-2 * u))).sum(-1)
        return logp

    def squash_fn(self, u: torch.Tensor) -> torch.Tensor:
        """Raw action -> the policy's action in ``[-1, 1]`` (identity when not squashing)."""
        return torch.tanh(u) if self.cfg.squash else u

    def to_env(self, a: torch.Tensor) -> torch.Tensor:
        """Policy action in ``[-1, 1]`` -> environment units (clipped to the bounds)."""
        lo, hi = self.action_low.to(a), self.action_high.to(a)
        return torch.maximum(torch.minimum(lo + (a + 1) * 0.5 * (hi - lo), hi), lo)

    def from_env(self, env_actions: torch.Tensor) -> torch.Tensor:
        """Environment units -> the policy's action space ``[-1, 1]``."""
        lo, hi = self.action_low.to(env_actions), self.action_high.to(env_actions)
        return 2 * (env_actions - lo) / (hi - lo) - 1

    def raw_from_env(self, env_actions: torch.Tensor) -> torch.Tensor:
        """Raw actions ``u`` for actions given in environment units (``atanh`` when squashing)."""
        a = self.from_env(env_actions)
        return torch.atanh(a.clamp(-ATANH_CLIP, ATANH_CLIP)) if self.cfg.squash else a

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None,
            deterministic: bool = False) -> dict[str, torch.Tensor]:
        """Sample (or, ``deterministic``, take the mean) action for observations ``[N, D]``.

        Returns ``raw_actions``, ``actions`` (in ``[-1, 1]``), ``env_actions`` and ``log_probs``
        (of the raw action; for the deterministic mean it is the density at the mean)."""
        mean, log_std = self.dist_params(obs)
        if deterministic:
            u = mean
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            u = mean + eps * log_std.exp()
        a = self.squash_fn(u)
        return {"raw_actions": u, "actions": a, "env_actions": self.to_env(a),
                "log_probs": self.log_prob_raw(mean, log_std, u)}

    # ------------------------------------------------------------------ the Policy contract
    def forward(self, rollout: Rollout, steps: torch.Tensor | None = None, with_values: bool = False,
                with_entropy: bool = False, noise: torch.Tensor | None = None, with_mean: bool = False):
        """Log-probs ``[B, T]`` (or ``[B, K]`` at ``steps``) of the rollout's recorded actions.

        Extra outputs turn the result into a dict with ``log_probs`` and:

        * ``with_values``: ``values [B, K]`` from the value head;
        * ``with_entropy``: ``entropy [B, K]`` of the Gaussian over the raw action (before the tanh
          when squashing: the squashed distribution's entropy has no closed form);
        * ``noise [B, K, A]`` (standard normal): a reparameterised sample ``u = mu + sigma * noise``
          instead of the recorded actions: ``actions [B, K, A]`` in ``[-1, 1]`` with gradients, and
          their ``log_probs`` (SAC's actor loss);
        * ``with_mean``: ``mean_actions [B, K, A]``, the squashed mean in ``[-1, 1]`` (behaviour cloning).
        """
        obs = rollout.data["observations"].to(self.device).float()
        if steps is not None:
            steps = steps.to(obs.device)
            obs = obs.gather(1, steps.unsqueeze(-1).expand(-1, -1, obs.shape[-1]))
        mean, log_std = self.dist_params(obs)
        out: dict[str, torch.Tensor] = {}
        if noise is not None:
            u = mean + noise.to(mean) * log_std.exp()
            out["actions"] = self.squash_fn(u)
        else:
            if "raw_actions" in rollout.data:
                u = rollout.data["raw_actions"].to(obs.device).float()
            else:
                u = self.raw_from_env(rollout.data["actions"].to(obs.device).float())
            if steps is not None:
                u = u.gather(1, steps.unsqueeze(-1).expand(-1, -1, u.shape[-1]))
        logp = self.log_prob_raw(mean, log_std, u)
        if not (with_values or with_entropy or noise is not None or with_mean):
            return logp
        out["log_probs"] = logp
        if with_values:
            if not self.has_value_head:
                raise ValueError("this gaussian policy has no value head; set policy.value_head: true")
            out["values"] = self.value(obs).squeeze(-1)
        if with_entropy:
            out["entropy"] = (log_std + 0.5 * (1 + LOG_2PI)).sum(-1)
        if with_mean:
            out["mean_actions"] = self.squash_fn(mean)
        return out

    def reference_log_probs(self, rollout: Rollout, steps: torch.Tensor | None = None) -> torch.Tensor:
        raise ConfigError(
            "the gaussian policy has no reference policy (it is trained from scratch, there is no base model "
            "to stay close to); set the update's KL coefficient to 0 (for ppo: update.kl_coef: 0)"
        )

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, path: str) -> None:
        """``model.safetensors`` (all weights) and ``config.json`` (the policy config), loadable with
        :meth:`from_pretrained`."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({"policy": "gaussian", **asdict(self.cfg)}, indent=2))

    @classmethod
    def from_pretrained(cls, path: str) -> "GaussianPolicy":
        """Rebuild a policy saved by :meth:`save_pretrained` (a run's ``policy/`` folder)."""
        from safetensors.torch import load_file

        from polyrl.config import from_dict
        from polyrl.paths import resolve_path

        p = Path(resolve_path(str(path)))
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise ConfigError(f"{str(path)!r} is not a saved gaussian policy (expected config.json and model.safetensors)")
        data = json.loads((p / "config.json").read_text())
        if data.pop("policy", None) != "gaussian":
            raise ConfigError(f"{str(path)!r}: config.json does not describe a gaussian policy")
        policy = cls(from_dict(GaussianPolicyConfig, data, "policy"))
        policy.load_state_dict(load_file(str(p / "model.safetensors")))
        return policy


__all__ = ["GaussianPolicy", "GaussianPolicyConfig", "ACTIVATIONS"]
