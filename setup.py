"""puma_jax: margin-based data pruning for adversarial training (PUMA), in JAX."""

import setuptools

setuptools.setup(
  name='puma_jax',
  version='0.1.0',
  description=(
    'PUMA (margin-based data pruning) for adversarial training in JAX/Flax: '
    'DeepFool margins at scale, pruning, per-example-eps TRADES/PGD-AT, AutoAttack.'
  ),
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  python_requires='>=3.11,<3.12',
  packages=setuptools.find_packages(include=['puma_jax', 'puma_jax.*']),
  package_data={'puma_jax.datasets': ['embedded/*.npz', 'embedded/*.md']},
  install_requires=[
    'jax>=0.10.0,<0.11',
    'jaxlib>=0.10.0,<0.11',
    'flax>=0.12.0,<0.13',
    'optax>=0.2.5,<0.3',
    'orbax-checkpoint>=0.12.0,<0.13',
    'tensorflow-datasets>=4.9.9,<4.10',
    # TFDS imports importlib_resources but does not declare it.
    'importlib_resources>=6.0',
    'array-record>=0.8.1,<0.9',
    'grain>=0.2.12,<0.3',
    'ml_collections>=1.0,<2',
    'chex>=0.1.90,<0.2',
    'numpy>=2.0,<3',
    'scipy>=1.11,<2',
    'absl-py>=2.1,<3',
    # TensorBoard event files without TensorFlow.
    'tensorboardX>=2.6,<3',
    'matplotlib>=3.8,<4',
    # PyTorch state_dicts read and written without torch (python -m puma_jax.export).
    'safetensors>=0.4,<1',
  ],
  extras_require={
    # jupytext: docs/make_tutorial_notebook.py and its test.
    'test': ['pytest>=8,<10', 'pytest-xdist>=3.5,<4', 'ruff>=0.6,<1', 'jupytext>=1.16,<2'],
    # Converting an ImageNet-style folder tree of JPEGs.
    'imagenet': ['pillow>=10,<14'],
  },
)
