"""Hydra search-path plugin: config groups contributed by installed impruver plugins.

A plugin package declares ``[project.entry-points.impruver_conf] NAME = "its_package.conf"`` (a package holding
YAML files laid out like impruver's own ``conf/``: ``dataset/x.yaml``, ``model/y.yaml``, ...). Each such package
is appended to Hydra's search path as ``pkg://its_package.conf``, so its options can be selected
(``dataset=x``) by the command line and the compose API alike, with no change to impruver.
"""

from __future__ import annotations

import importlib.metadata as md

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ENTRY_POINT_GROUP = "impruver_conf"


class ImpruverPluginSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            provider = ep.dist.name if ep.dist else ep.name
            search_path.append(provider=f"impruver-plugin:{provider}", path=f"pkg://{ep.value}")
