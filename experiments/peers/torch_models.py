"""PyTorch twins of puma_jax's `small_cnn` and `preact_resnet18`, built from `model.json`.

Runs in the peer virtualenv (torch only, no JAX). `experiments/peers/export.py` writes
`model.json` ({'name', 'kwargs', 'image_shape', 'num_classes'}) and `model.npz` (a
state_dict: OIHW convs, (out, in) linears, BatchNorm running statistics, `fc1` over
PyTorch's CHW flatten); `load(dir)` builds the module, loads the weights strictly and
returns it in eval mode. Inputs are NCHW float32 in [0, 1]; normalisation (the models'
`mean`/`std`) happens inside, as in puma_jax.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class _Normalize(nn.Module):
  def __init__(self, mean, std, channels):
    super().__init__()
    self.active = mean is not None or std is not None
    mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(1, channels, 1, 1)
    std = torch.tensor(std if std is not None else [1.0] * channels).view(1, channels, 1, 1)
    self.register_buffer('mean', mean, persistent=False)
    self.register_buffer('std', std, persistent=False)

  def forward(self, x):
    return (x - self.mean) / self.std if self.active else x


class SmallCNN(nn.Module):
  """puma_jax.models.small_cnn.SmallCNN: conv(k, pad k//2)+ReLU[+2x2 max-pool] blocks, dense."""

  def __init__(
    self,
    image_shape,
    num_classes=10,
    conv_channels=(16, 32),
    pool_after=(True, True),
    dense_widths=(128,),
    kernel_size=3,
    mean=None,
    std=None,
  ):
    super().__init__()
    h, w, c = image_shape
    self.normalize = _Normalize(mean, std, c)
    self.pool_after = list(pool_after)
    for i, ch in enumerate(conv_channels):
      setattr(self, f'conv{i + 1}', nn.Conv2d(c, ch, kernel_size, padding=kernel_size // 2))
      c = ch
      if pool_after[i]:
        h, w = h // 2, w // 2
    width = c * h * w
    self.num_dense = len(dense_widths)
    for j, out in enumerate([*dense_widths, num_classes]):
      setattr(self, f'fc{j + 1}', nn.Linear(width, out))
      width = out

  def forward(self, x):
    x = self.normalize(x)
    for i, pool in enumerate(self.pool_after):
      x = F.relu(getattr(self, f'conv{i + 1}')(x))
      if pool:
        x = F.max_pool2d(x, 2)
    x = torch.flatten(x, 1)  # CHW order, as the exported fc1 expects
    for j in range(self.num_dense):
      x = F.relu(getattr(self, f'fc{j + 1}')(x))
    return getattr(self, f'fc{self.num_dense + 1}')(x)


class PreActBlock(nn.Module):
  """o = relu(bn1(x)); sc = 1x1 conv(o) if the shape changes else x; conv2(relu(bn2(conv1(o)))) + sc."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, 'shortcut') else x
    out = self.conv1(out)
    return self.conv2(F.relu(self.bn2(out))) + shortcut


class PreActResNet18(nn.Module):
  """puma_jax.models.preact_resnet.PreActResNet18 (the TRADES / peer-benchmark layout)."""

  def __init__(self, image_shape, num_classes=10, width=64, mean=None, std=None):
    super().__init__()
    self.normalize = _Normalize(mean, std, image_shape[2])
    self.conv1 = nn.Conv2d(image_shape[2], width, 3, padding=1, bias=False)
    in_planes = width
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
      planes = width * mult
      blocks = [PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)]
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
      in_planes = planes
    self.bn = nn.BatchNorm2d(in_planes)
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    out = self.conv1(self.normalize(x))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    out = F.relu(self.bn(out)).mean(dim=(2, 3))
    return self.linear(out)


CLASSES = {'small_cnn': SmallCNN, 'preact_resnet18': PreActResNet18}


def build(arch):
  """The module that `arch` (the contents of model.json) describes, with fresh weights."""
  if arch['name'] not in CLASSES:
    raise ValueError(f'model.json names {arch["name"]!r}; the peers know {sorted(CLASSES)}')
  return CLASSES[arch['name']](
    image_shape=tuple(arch['image_shape']), num_classes=arch['num_classes'], **arch['kwargs']
  )


def load(directory):
  """(module in eval mode, arch) from `directory`/model.json and model.npz (strict load)."""
  with open(os.path.join(directory, 'model.json')) as f:
    arch = json.load(f)
  model = build(arch)
  with np.load(os.path.join(directory, 'model.npz')) as f:
    state = {k: torch.from_numpy(f[k]) for k in f.files}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(
      f'{directory}/model.npz does not fit {arch["name"]}: missing {missing}, '
      f'unexpected {unexpected}; re-export it with experiments/peers/export.py'
    )
  return model.eval(), arch
