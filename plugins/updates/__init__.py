"""Update algorithms that work on ``[B, T]`` log-probs, shared by every modality."""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .a_star_po import AStarPO, AStarPOConfig
from .ddpo import DDPO, DDPOConfig
from .dr_po import DRPO, check_reset_sampler
from .grpo import GRPO, GRPOConfig
from .nlpo import NLPO, NLPOConfig
from .ppo import PPO, PPOConfig
from .rebel import REBEL, REBELConfig
from .reinforce import Reinforce, ReinforceConfig
from .rloo import RLOO, RLOOConfig


@hookimpl
def polyrl_updates():
    return [
        ComponentSpec("a_star_po", AStarPO, AStarPOConfig, description="A*-PO: offline V* from reference samples, regression onto the optimal advantage"),
        ComponentSpec("ddpo", DDPO, DDPOConfig, description="DDPO clipped objective, per-prompt stat tracker, per-sample step shuffle"),
        ComponentSpec("dr_po", DRPO, PPOConfig, description="DR-PO: PPO on rollouts reset to dataset prefixes (forced tokens masked out)"),
        ComponentSpec("grpo", GRPO, GRPOConfig, description="GRPO group-normalised advantages, token-level clip, optional k3 KL"),
        ComponentSpec("nlpo", NLPO, NLPOConfig, description="NLPO: PPO on the policy masked to the top-p of a periodically refreshed copy"),
        ComponentSpec("ppo", PPO, PPOConfig, description="PPO with a value head: GAE, clipped surrogate and value loss, entropy bonus, adaptive token KL"),
        ComponentSpec("rebel", REBEL, REBELConfig, description="REBEL: regress reward differences of sample pairs with log-ratio differences"),
        ComponentSpec("reinforce", Reinforce, ReinforceConfig, description="REINFORCE with a batch, group or moving-average baseline"),
        ComponentSpec("rloo", RLOO, RLOOConfig, description="RLOO: leave-one-out baseline, KL in the reward, clipped sequence ratio"),
    ]


@hookimpl
def polyrl_configure(config):
    check_reset_sampler(config)


@hookimpl
def polyrl_run_start(trainer):
    """Updates with a stage before the first iteration (A*-PO's V*, NLPO's masking policy)."""
    start = getattr(trainer.update, "run_start", None)
    if callable(start):
        start(trainer)
