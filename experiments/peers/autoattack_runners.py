"""AutoAttack in PyTorch: the original (fra31/auto-attack) and torchattacks', with flags per attack.

Runs in the peer virtualenv. Both return `(flags bool[N, 5], x_adv [N,C,H,W], info)`:
flags[:, 0] is "classified correctly", flags[:, i] "still robust after attack i" for
the cascade APGD-CE, APGD-T, FAB-T, Square (STAGES), and x_adv holds, for each broken
example, the point that broke it (x elsewhere).

* `original`: `autoattack.AutoAttack(version='standard')`, the reference. Its
  `run_standard_evaluation` runs the four attacks on the still-robust examples in
  batches of `bs`; here each attack is one `run_standard_evaluation` call with
  `attacks_to_run=[attack]` on the examples the previous ones left robust, which runs
  the same batches with the same seeds, and gives the flags after every attack.
  `budgets` other than the standard ones (for smoke tests) change its attacks'
  `n_iter` / `n_queries`.
* `torchattacks_standard`: `torchattacks.AutoAttack(version='standard')` as shipped:
  note that its APGD, APGD-T and FAB-T keep their default 10 iterations, where the
  original runs 100 (both use 9 target classes and 5,000 Square queries); or, with
  `budgets`, the same torchattacks classes at those budgets.
"""

import time

import torch

STAGES = ('clean', 'apgd-ce', 'apgd-t', 'fab-t', 'square')
STANDARD = dict(apgd_steps=100, fab_steps=100, num_targets=9, square_queries=5000)


def _predict(model, x, bs):
  with torch.no_grad():
    return torch.cat([model(x[i : i + bs]).argmax(1) for i in range(0, len(x), bs)])


def _cascade(model, x, y, bs, attacks, name, log):
  """Runs `attacks` (STAGES[1:] order), each on the examples the previous left robust.

  Args:
    attacks: one callable per attack, `(x_robust, y_robust) -> x_adv` for those examples.
    name: what the log lines call this AutoAttack.

  Returns:
    `(flags, x_adv, attack wall seconds by attack name)`, as the module docstring says.
  """
  flags = torch.zeros(len(x), len(STAGES), dtype=torch.bool)
  flags[:, 0] = _predict(model, x, bs) == y
  x_adv = x.clone()
  times = {}
  for i, (attack, run) in enumerate(zip(STAGES[1:], attacks, strict=True), start=1):
    robust = flags[:, i - 1].nonzero().squeeze(1)
    flags[:, i] = flags[:, i - 1]
    t0 = time.perf_counter()
    if len(robust):
      adv = run(x[robust], y[robust])
      broken = _predict(model, adv, bs) != y[robust]
      flags[robust[broken], i] = False
      x_adv[robust[broken]] = adv[broken]
    times[attack] = time.perf_counter() - t0
    log(
      f'[peer] {name}: robust accuracy after {attack.upper()}: '
      f'{100 * flags[:, i].float().mean():.2f}% ({times[attack]:.1f} s)'
    )
  return flags, x_adv, times


def original(model, x, y, *, norm, eps, seed, bs, budgets=None, log=print):
  """The reference AutoAttack, one attack at a time (see the module docstring)."""
  from autoattack import AutoAttack

  norm = {'linf': 'Linf', 'l2': 'L2'}[norm]
  adversary = AutoAttack(model, norm=norm, eps=eps, seed=seed, version='standard', device='cpu')
  adversary.verbose = False
  b = dict(STANDARD, **(budgets or {}))
  adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = b['apgd_steps']
  adversary.fab.n_iter = b['fab_steps']
  adversary.apgd_targeted.n_target_classes = adversary.fab.n_target_classes = b['num_targets']
  adversary.square.n_queries = b['square_queries']
  ran = {
    'apgd_steps': adversary.apgd.n_iter,
    'apgdt_steps': adversary.apgd_targeted.n_iter,
    'fab_steps': adversary.fab.n_iter,
    'num_targets': adversary.apgd_targeted.n_target_classes,
    'fab_num_targets': adversary.fab.n_target_classes,
    'square_queries': adversary.square.n_queries,
    'apgd_restarts': adversary.apgd.n_restarts,
  }

  def one(attack):
    def run(xs, ys):
      adversary.attacks_to_run = [attack]
      return adversary.run_standard_evaluation(xs, ys, bs=bs)

    return run

  attacks = [one(attack) for attack in STAGES[1:]]
  flags, x_adv, times = _cascade(model, x, y, bs, attacks, 'original AutoAttack', log)
  return flags, x_adv, {'budgets': ran, 'attack_wall_s': times}


def torchattacks_standard(model, x, y, *, norm, eps, seed, bs, budgets=None, log=print):
  """torchattacks' AutoAttack (as shipped, or its attack classes at `budgets`)."""
  import torchattacks

  norm = {'linf': 'Linf', 'l2': 'L2'}[norm]
  with torch.no_grad():
    num_classes = model(x[:1]).shape[1]
  if budgets is None:
    atk = torchattacks.AutoAttack(
      model, norm=norm, eps=eps, version='standard', n_classes=num_classes, seed=seed
    )
    parts = atk._autoattack.attacks  # the MultiAttack it runs: APGD, APGDT, FAB, Square
  else:
    common = dict(norm=norm, eps=eps, seed=seed, n_restarts=1)
    parts = [
      torchattacks.APGD(model, steps=budgets['apgd_steps'], loss='ce', **common),
      torchattacks.APGDT(model, steps=budgets['apgd_steps'], n_classes=num_classes, **common),
      torchattacks.FAB(
        model, steps=budgets['fab_steps'], multi_targeted=True, n_classes=num_classes, **common
      ),
      torchattacks.Square(model, n_queries=budgets['square_queries'], **common),
    ]
  apgd, apgdt, fab, square = parts
  ran = {
    'apgd_steps': apgd.steps,
    'apgdt_steps': apgdt.steps,
    'fab_steps': fab.steps,
    'num_targets': apgdt.n_target_classes,
    'fab_num_targets': fab.n_target_classes,
    'square_queries': square.n_queries,
  }

  # The cascade of MultiAttack, one attack at a time so that the flags after each are kept;
  # each attack runs on batches of `bs` of the examples still robust.
  def batched(part):
    def run(xs, ys):
      return torch.cat(
        [part(xs[i : i + bs], ys[i : i + bs]).detach() for i in range(0, len(xs), bs)]
      )

    return run

  attacks = [batched(part) for part in parts]
  flags, x_adv, times = _cascade(model, x, y, bs, attacks, 'torchattacks AutoAttack', log)
  return flags, x_adv, {'budgets': ran, 'attack_wall_s': times}


RUNNERS = {'autoattack': original, 'torchattacks': torchattacks_standard}
