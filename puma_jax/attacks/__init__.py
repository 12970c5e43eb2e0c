from puma_jax.attacks import apgd as apgd
from puma_jax.attacks import autoattack as autoattack
from puma_jax.attacks import fab as fab
from puma_jax.attacks import lp as lp
from puma_jax.attacks import square as square
