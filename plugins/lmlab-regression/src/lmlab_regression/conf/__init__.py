"""Hydra config groups of the plugin (task/, data/); the ``lmlab.configs`` entry point names this
package, and lmlab adds it to Hydra's search path. A package, so that it can be found by import name."""
