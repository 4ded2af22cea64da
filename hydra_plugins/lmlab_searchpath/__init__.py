"""Hydra discovers this plugin in the ``hydra_plugins`` namespace and lets it extend the config
search path: every package registered under the ``lmlab.configs`` entry-point group joins it, so
a pip-installed plugin's ``task/NAME.yaml`` becomes ``task=NAME`` on the command line."""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LmlabPluginConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            from lmlab.plugin_configs import plugin_config_dirs
        except ImportError:  # lmlab itself is not importable: nothing to add
            return
        for name, (package, _folder) in sorted(plugin_config_dirs().items()):
            search_path.append(provider=f"lmlab-plugin-{name}", path=f"pkg://{package}")
