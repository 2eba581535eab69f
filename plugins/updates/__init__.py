"""Update algorithms that work on ``[B, T]`` log-probs, shared by every modality."""

from __future__ import annotations

from polyrl import ComponentSpec, hookimpl

from .a_star_po import AStarPO, AStarPOConfig
from .ddpo import DDPO, DDPOConfig
from .dr_po import DRPO, DRPOConfig
from .grpo import GRPO, GRPOConfig
from .nlpo import NLPO, NLPOConfig
from .ppo import PPO, PPOConfig
from .rebel import REBEL, REBELConfig
from .reinforce import Reinforce, ReinforceConfig
from .rloo import RLOO, RLOOConfig


#: The on-policy rollout formats: every update here trains on ``[B, T]`` step log-probs of them.
ON_POLICY = ("diffusion_steps", "consistency_steps", "flow_steps", "tokens", "env_steps")


def _kl(field: str):
    """``requires`` of an update whose KL term (``field`` > 0) needs the reference policy."""

    def requires(config) -> dict[str, str]:
        if getattr(config, field) > 0:
            return {"reference": f"for the KL term; set update.{field}: 0 to train without it"}
        return {}
    return requires


def _actor_critic(*extra: str):
    """``requires`` of PPO and its variants: a value head, entropies, and a reference with ``kl_coef > 0``."""
    kl = _kl("kl_coef")

    def requires(config) -> dict[str, str]:
        return {"value_head": "", "entropy": "", **{e: "" for e in extra}, **kl(config)}

    return requires


@hookimpl
def polyrl_updates():
    return [
        ComponentSpec("a_star_po", AStarPO, AStarPOConfig, accepts=ON_POLICY, requires={"reference"},
                      description="A*-PO: offline V* from reference samples, regression onto the optimal advantage"),
        ComponentSpec("ddpo", DDPO, DDPOConfig, accepts=ON_POLICY,
                      requires=lambda config: {"step_log_probs": "", **_kl("kl_coef")(config)},
                      description="DDPO clipped objective, per-prompt stat tracker, per-sample step shuffle"),
        ComponentSpec("dr_po", DRPO, DRPOConfig, accepts=("tokens",), requires=_actor_critic("dataset_resets"),
                      description="DR-PO: PPO on rollouts reset to dataset prefixes (forced tokens masked out)"),
        ComponentSpec("grpo", GRPO, GRPOConfig, accepts=ON_POLICY, requires=_kl("beta"),
                      description="GRPO group-normalised advantages, token-level clip, optional k3 KL"),
        ComponentSpec("nlpo", NLPO, NLPOConfig, accepts=("tokens",), requires=_actor_critic("token_mask"),
                      description="NLPO: PPO on the policy masked to the top-p of a periodically refreshed copy"),
        ComponentSpec("ppo", PPO, PPOConfig, accepts=ON_POLICY, requires=_actor_critic(),
                      description="PPO with a value head: GAE, clipped surrogate and value loss, entropy bonus, adaptive token KL"),
        ComponentSpec("rebel", REBEL, REBELConfig, accepts=ON_POLICY, requires=_kl("kl_coef"),
                      description="REBEL: regress reward differences of sample pairs with log-ratio differences"),
        ComponentSpec("reinforce", Reinforce, ReinforceConfig, accepts=ON_POLICY,
                      description="REINFORCE with a batch, group or moving-average baseline"),
        ComponentSpec("rloo", RLOO, RLOOConfig, accepts=ON_POLICY, requires=_kl("kl_coef"),
                      description="RLOO: leave-one-out baseline, KL in the reward, clipped sequence ratio"),
    ]
