"""``hydra/sweeper: optuna`` for current Optuna, with studies that resume where they stopped.

lmlab's own sweeper instead of the ``hydra-optuna-sweeper`` package, which pins ``optuna<3`` (and
Optuna 2 cannot open an SQLite study under SQLAlchemy 2, which MLflow's stack needs). The config
keeps that plugin's contract: direction, n_trials, n_jobs, storage, study_name, sampler, params in
Hydra's sweep syntax. Only ``config`` and ``optuna_sweeper`` are imported when Hydra scans
plugins; Optuna itself is imported when a sweep starts.
"""
