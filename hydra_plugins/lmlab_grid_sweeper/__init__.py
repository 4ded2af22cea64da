"""lmlab's grid sweeper: Hydra's basic sweeper that stops at the first failed job, with its error.

``hydra.callbacks.grid_sweeper`` in conf/config.yaml puts it in place of ``hydra/sweeper: basic``.
"""
