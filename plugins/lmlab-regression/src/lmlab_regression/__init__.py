"""lmlab-regression: an example lmlab plugin adding ``task=regression``.

Everything reaches lmlab through the entry points in this package's pyproject.toml; nothing here
is imported until lmlab asks for it, so this module stays free of heavy imports.
"""

__version__ = "0.1.0"
