"""impruver's own plugins, registered through the entry-point group a third-party plugin uses.

``pyproject.toml`` names :mod:`impruver.plugins.builtin` in the group ``impruver_plugins``; the registries import
it on first use. A third-party package does the same with its own module, or declares single builders in the
per-registry groups (``impruver_formats``, ``impruver_models``, ...), and contributes config-group options
(``dataset=...``) through the group ``impruver_conf`` (see :func:`conf_sources`).
"""

from __future__ import annotations

import importlib.metadata as md

CONF_GROUP = "impruver_conf"


def conf_sources() -> dict[str, str]:
    """Config packages contributed by installed plugins: ``{"pkg://plugin.conf": "plugin-distribution"}``.

    A plugin declares ``[project.entry-points.impruver_conf] NAME = "its_package.conf"``: a package laid out like
    impruver's own ``conf/`` (``dataset/x.yaml`` ...). impruver appends each to Hydra's search path
    (``hydra.searchpath``), so ``dataset=x`` works on the command line and in the compose API alike.
    """
    return {f"pkg://{ep.value}": (ep.dist.name if ep.dist else ep.name) for ep in md.entry_points(group=CONF_GROUP)}
