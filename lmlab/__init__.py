"""lmlab: language-model experiments on PyTorch Lightning, composed with Hydra, tracked in MLflow."""

from lmlab import resolvers as _resolvers

__version__ = "0.1.0"

# Configs refer to these, and a config may be resolved by any code that imports lmlab.
_resolvers.register()
