"""Pure attack functions of a `logits_fn` or `loss_fn`; see docs/architecture.md."""

from puma_jax.attacks import apgd as apgd
from puma_jax.attacks import autoattack as autoattack
from puma_jax.attacks import fab as fab
from puma_jax.attacks import lp as lp
from puma_jax.attacks import square as square
from puma_jax.attacks.deepfool import DeepFoolResult as DeepFoolResult
from puma_jax.attacks.deepfool import deepfool as deepfool
from puma_jax.attacks.pgd import pgd as pgd
from puma_jax.attacks.trades import trades_perturb as trades_perturb
