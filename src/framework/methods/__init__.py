"""Methods, one module each. Inference-time methods run per item (prompt × seed) on a frozen backbone."""

from framework.config import follows_reward_gradients
from framework.errors import FrameworkError
from framework.methods.base import Base
from framework.methods.best_of_n import BestOfN
from framework.items import Item, ItemResult, derive_seed
from framework.methods.common import Method, Problem
from framework.methods.dno import DNO
from framework.methods.aig import AIG
from framework.methods.dno_zo import DNOZeroOrder
from framework.methods.draft import FineTuneThenSample
from framework.methods.lora_scale import LoRAScale
from framework.methods.mira import MIRA
from framework.methods.mira_dpo import MIRADPO

__all__ = ["Item", "ItemResult", "Method", "Problem", "build_method", "derive_seed"]

METHODS = {
    "base": Base,
    "best_of_n": BestOfN,
    "dno": DNO,
    "mira": MIRA,
    "dno_zo": DNOZeroOrder,
    "mira_dpo": MIRADPO,
    "draft": FineTuneThenSample,
    "lora_scale": LoRAScale,
    "aig": AIG,
}


def build_method(cfg, reward) -> Method:
    """The method of `cfg`, checked against the reward: gradient methods refuse non-differentiable rewards."""
    method = METHODS[cfg.name](cfg)
    if follows_reward_gradients(cfg) and not reward.differentiable:
        raise FrameworkError(
            f"method {cfg.name} follows reward gradients, but reward {reward.name} is not differentiable; "
            "use a black-box method (method=mira_dpo, dno_zo or best_of_n) or a differentiable reward"
        )
    return method
