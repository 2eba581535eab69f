"""``smiling``: the score-matching imitation reward (SMILING; Wu, Chen, Swamy, Brantley, Sun 2024).

Two epsilon-prediction diffusion networks model states (or state-action pairs): the *expert*
network, trained once on the demonstrations, and the *learner* network, retrained on the
learner's recent states every ``learn_every`` environment steps, warm-started from its previous
weights (follow-the-leader). Both are trained by plain regression (the DDPM loss
``|eps_hat(sqrt(abar_t) s + sqrt(1 - abar_t) eps, t) - eps|^2``). With
``s_t = sqrt(abar_t) s + sqrt(1 - abar_t) eps``, the cost of a state is

    cost(s) = E_t E_eps [ |eps_hat_expert(s_t, t) - eps|^2 - |eps_hat_learner(s_t, t) - eps|^2 ],

an estimate of the score (Fisher) divergence between the learner's and the expert's state
distributions at ``s``; the reward is ``-cost``. As in the authors' code ``t`` runs over an even
grid of ``num_levels`` levels ``0, T/K, 2T/K, ...`` with one ``eps`` per level and state, the
squared errors are means over dimensions, and every batch of rewards is standardised and scaled
by ``scale``. Off-policy learners re-score their replay batches with :meth:`score_transitions`
(``sac`` with ``replay_rewards: recompute``).

Networks (the paper's): an MLP with one hidden layer of 256 and LeakyReLU on
``[x, time embedding]``, the time embedding sinusoidal (16) -> 32 -> LeakyReLU -> 16; AdamW, lr
5e-3, batch 1024; DDPM linear betas 1e-4 .. 0.02 over 5000 training steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from polyrl.types import ConfigError, Rollout

from .demonstrations import Demos, load_demos
from .nets import SinusoidalEmbedding, average_gradients, seeded
from .transitions import FeatureBuffer, TransitionReward, net_state, rollout_transitions, standardize


@dataclass
class SmilingConfig:
    """Settings of the SMILING reward (defaults: the paper's, except where marked as scaled down for CPU)."""

    demos: str
    """Demonstrations file (.npz, format in docs/imitation.md)."""
    demo_episodes: int = 0
    """Use the first this many episodes of the file (0: all)."""
    input: Literal["states", "states_actions"] = "states"
    """Model states (imitation from observation alone) or state-action pairs."""
    num_train_timesteps: int = 5000
    """DDPM training steps T (linear betas)."""
    beta_start: float = 1e-4
    """First beta of the linear DDPM schedule."""
    beta_end: float = 0.02
    """Last beta of the linear DDPM schedule."""
    num_levels: int = 50
    """Noise levels K of the cost, evenly spaced over [0, T) (paper: 500; scaled down for CPU, as every replay
    batch is scored at every level). Must divide ``num_train_timesteps``."""
    hidden_dim: int = 256
    """Width of the score networks' hidden layers."""
    hidden_depth: int = 1
    """Number of hidden layers of the score networks."""
    time_embedding_dim: int = 16
    """Size of the sinusoidal time embedding (its MLP is 16 -> 32 -> 16)."""
    lr: float = 5e-3
    """AdamW learning rate of both score networks."""
    batch_size: int = 1024
    """Batch size of score-network training."""
    expert_epochs: int = 4000
    """Epochs of expert-network training on the demonstrations (before the first reward)."""
    learn_every: int = 1001
    """Retrain the learner network every this many environment steps."""
    learn_samples: int = 100_000
    """States drawn uniformly with replacement from the learner buffer for each retraining epoch."""
    learn_epochs: int = 1
    """Epochs over those states at each retraining."""
    buffer_size: int = 200_000
    """How many of the learner's most recent states are kept for retraining."""
    standardize: bool = True
    """Standardise each batch of rewards (zero mean, unit std) before scaling."""
    scale: float = 0.1
    """Multiplies the (standardised) rewards."""
    seed: int = 0
    """Seed of the networks' initialisation and of expert training (the same on every process)."""

    def check(self) -> None:
        for name in ("num_train_timesteps", "num_levels", "hidden_dim", "hidden_depth", "batch_size",
                     "learn_every", "learn_samples", "buffer_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rewards.smiling.{name} must be >= 1, got {getattr(self, name)}")
        if self.expert_epochs < 0 or self.learn_epochs < 0:
            raise ConfigError("rewards.smiling.expert_epochs and learn_epochs must be >= 0")
        if self.num_train_timesteps % self.num_levels:
            divisors = [d for d in range(1, self.num_train_timesteps + 1) if self.num_train_timesteps % d == 0]
            raise ConfigError(
                f"rewards.smiling.num_levels={self.num_levels} must divide num_train_timesteps="
                f"{self.num_train_timesteps}; accepted: {divisors[:24]}{' ...' if len(divisors) > 24 else ''}"
            )
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"rewards.smiling: need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.time_embedding_dim < 4 or self.time_embedding_dim % 2:
            raise ConfigError(f"rewards.smiling.time_embedding_dim must be even and >= 4, got {self.time_embedding_dim}")
        load_demos(self.demos, self.demo_episodes)  # format errors surface before anything is built


# ---------------------------------------------------------------------------- diffusion pieces
def ddpm_alphas_cumprod(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """``abar_t = prod_{s <= t} (1 - beta_s)`` for linear betas (the DDPM schedule), ``[T]``."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt(abar_t) x + sqrt(1 - abar_t) noise`` with ``t`` broadcast over the leading dims of ``x``."""
    ab = alphas_cumprod.to(x.device)[t]
    while ab.dim() < x.dim():
        ab = ab.unsqueeze(-1)
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


class ScoreNet(nn.Module):
    """epsilon-prediction MLP ``eps_hat(x_t, t)`` (see the module docs for the architecture)."""

    def __init__(self, dim: int, hidden_dim: int = 256, hidden_depth: int = 1, time_dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(time_dim), nn.Linear(time_dim, 2 * time_dim),
                                      nn.LeakyReLU(), nn.Linear(2 * time_dim, time_dim))
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden_dim), nn.LeakyReLU()]
        for _ in range(hidden_depth - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU()]
        self.mid = nn.Sequential(*layers)
        self.out = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # = out(mid(cat([x, time_mlp(t)]))), computed without repeating the time branch for equal t:
        # the first layer splits into W_x x + (W_t time_mlp(t) + b), the latter once per distinct t.
        levels, inverse = torch.unique(t, return_inverse=True)
        first = self.mid[0]
        w_x, w_t = first.weight[:, : self.dim], first.weight[:, self.dim:]
        h = x @ w_x.T + F.linear(self.time_mlp(levels), w_t, first.bias)[inverse]
        return self.out(self.mid[1:](h))


def denoising_loss(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The DDPM regression loss ``mean |eps_hat(x_t, t) - eps|^2`` (over batch and dimensions)."""
    return F.mse_loss(net(add_noise(x, noise, t, alphas_cumprod), t), noise)


def smiling_cost(x: torch.Tensor, expert: Callable, learner: Callable, timesteps: torch.Tensor,
                 noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """SMILING's cost of each row of ``x [N, D]``:
    ``mean_k [ mean_d (eps_E(x_k, t_k) - eps_k)^2 - mean_d (eps_L(x_k, t_k) - eps_k)^2 ]`` with
    ``x_k = sqrt(abar_{t_k}) x + sqrt(1 - abar_{t_k}) eps_k``, for levels ``timesteps [K]`` and
    noise ``[K, N, D]`` (one draw per level and row). Returns ``[N]``; the reward is its negative."""
    k, n, d = noise.shape
    t = timesteps.to(x.device).repeat_interleave(n)  # [K*N]
    xt = add_noise(x.unsqueeze(0).expand(k, n, d).reshape(k * n, d), noise.reshape(k * n, d), t, alphas_cumprod)
    eps = noise.reshape(k * n, d)
    err_e = (expert(xt, t) - eps).pow(2).mean(-1)
    err_l = (learner(xt, t) - eps).pow(2).mean(-1)
    return (err_e - err_l).view(k, n).mean(0)


def train_score_net(net: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, epochs: int, batch_size: int,
                    alphas_cumprod: torch.Tensor, generator: torch.Generator, accelerator=None) -> float:
    """``epochs`` shuffled passes of DDPM regression over ``data [M, D]`` (``t`` uniform over
    ``[0, T)``, fresh noise per batch). Returns the mean loss of the last epoch (nan if none)."""
    device = next(net.parameters()).device
    n_t = alphas_cumprod.shape[0]
    last = float("nan")
    with torch.enable_grad():  # rewards are called under no_grad; the expert may train on first use
        for _ in range(epochs):
            last = _score_epoch(net, opt, data, batch_size, n_t, alphas_cumprod, generator, accelerator, device)
    return last


def _score_epoch(net, opt, data, batch_size, n_t, alphas_cumprod, generator, accelerator, device) -> float:
    """One shuffled pass; returns the mean loss."""
    perm = torch.randperm(data.shape[0], generator=generator)
    total, count = 0.0, 0
    for idx in perm.split(batch_size):
        x = data[idx].to(device)
        t = torch.randint(0, n_t, (x.shape[0],), generator=generator).to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        loss = denoising_loss(net, x, t, noise, alphas_cumprod)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(accelerator, net.parameters())
        opt.step()
        total += loss.item() * x.shape[0]
        count += x.shape[0]
    return total / count


class SmilingReward(TransitionReward):
    """Learned reward ``-cost(s)`` (see the module docs)."""

    def __init__(self, cfg: SmilingConfig, policy=None) -> None:
        self.cfg = cfg
        self.input = cfg.input
        env_id = getattr(policy, "env_id", None)
        self.demos: Demos = load_demos(cfg.demos, cfg.demo_episodes, env_id=env_id,
                                       obs_dim=getattr(policy, "obs_dim", None),
                                       action_dim=getattr(policy, "action_dim", None))
        self.expert_data = self.demos.features(cfg.input)
        dim = self.expert_data.shape[1]
        self.device = policy.device if policy is not None else torch.device("cpu")
        with seeded(cfg.seed):
            self.expert = ScoreNet(dim, cfg.hidden_dim, cfg.hidden_depth, cfg.time_embedding_dim).to(self.device)
            self.learner = ScoreNet(dim, cfg.hidden_dim, cfg.hidden_depth, cfg.time_embedding_dim).to(self.device)
        self.expert_opt = torch.optim.AdamW(self.expert.parameters(), lr=cfg.lr)
        self.learner_opt = torch.optim.AdamW(self.learner.parameters(), lr=cfg.lr)
        self.alphas_cumprod = ddpm_alphas_cumprod(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end).to(self.device)
        self.levels = torch.arange(0, cfg.num_train_timesteps, cfg.num_train_timesteps // cfg.num_levels)
        self.buffer = FeatureBuffer(cfg.buffer_size)
        self.expert_trained = False
        self.expert_loss = float("nan")
        self.steps_since_learn = 0
        self.rounds = 0

    # ------------------------------------------------------------------ expert
    def train_expert(self, accelerator=None) -> float:
        """Fit the expert network to the demonstrations (``expert_epochs`` epochs); idempotent."""
        if not self.expert_trained:
            g = torch.Generator().manual_seed(self.cfg.seed + 1)
            self.expert_loss = train_score_net(self.expert, self.expert_opt, self.expert_data, self.cfg.expert_epochs,
                                               self.cfg.batch_size, self.alphas_cumprod, g, accelerator)
            self.expert_trained = True
        return self.expert_loss

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def cost(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw SMILING cost ``[N]`` of feature rows ``x [N, F]`` (before standardisation)."""
        self.train_expert()
        x = x.to(self.device).float()
        noise = torch.randn((self.levels.numel(), *x.shape), generator=generator).to(self.device)
        return smiling_cost(x, self.expert, self.learner, self.levels, noise, self.alphas_cumprod).cpu()

    @torch.no_grad()
    def score_transitions(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        r = -self.cost(self.features(batch))
        return standardize(r, self.cfg.scale) if self.cfg.standardize else self.cfg.scale * r

    # ------------------------------------------------------------------ learning
    def learn(self, trainer, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        acc = getattr(trainer, "accelerator", None)
        metrics: dict[str, float] = {"expert_loss": self.train_expert(acc)}  # its last training epoch's loss
        x = self.features(rollout_transitions(rollout))
        g = trainer.generator("smiling-learner")
        # progress: the raw cost of what the learner just did, and of the demonstrations (before retraining)
        demo = self.expert_data[torch.randint(0, self.expert_data.shape[0], (min(1024, x.shape[0]),), generator=g)]
        metrics["cost_rollout"] = self.cost(x, g).mean().item()
        metrics["cost_demos"] = self.cost(demo, g).mean().item()
        self.buffer.add(x, self.rounds)
        self.steps_since_learn += x.shape[0]
        rounds, self.steps_since_learn = divmod(self.steps_since_learn, cfg.learn_every)
        if rounds:
            for _ in range(rounds):
                idx = self.buffer.indices(cfg.learn_samples, g)
                loss = train_score_net(self.learner, self.learner_opt, self.buffer.x[idx], cfg.learn_epochs,
                                       cfg.batch_size, self.alphas_cumprod, g, acc)
                self.rounds += 1
            metrics["learner_loss"] = loss
        metrics["buffer_size"] = float(self.buffer.size)
        metrics["rounds"] = float(self.rounds)
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "expert": net_state(self.expert), "learner": net_state(self.learner),
            "expert_opt": self.expert_opt.state_dict(), "learner_opt": self.learner_opt.state_dict(),
            "expert_trained": self.expert_trained, "expert_loss": self.expert_loss,
            "steps_since_learn": self.steps_since_learn, "rounds": self.rounds, "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.expert.load_state_dict(state["expert"])
        self.learner.load_state_dict(state["learner"])
        self.expert_opt.load_state_dict(state["expert_opt"])
        self.learner_opt.load_state_dict(state["learner_opt"])
        self.expert_trained = bool(state["expert_trained"])
        self.expert_loss = float(state["expert_loss"])
        self.steps_since_learn, self.rounds = int(state["steps_since_learn"]), int(state["rounds"])
        self.buffer.load_state_dict(state["buffer"])
