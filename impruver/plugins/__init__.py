"""impruver's own plugins, registered through the entry-point group a third-party plugin uses.

``pyproject.toml`` names :mod:`impruver.plugins.builtin` in the group ``impruver_plugins``; the registries import
it on first use. A third-party package does the same with its own module, or declares single builders in the
per-registry groups (``impruver_formats``, ``impruver_models``, ...), and contributes config-group options
(``dataset=...``) through the group ``impruver_conf`` (see ``hydra_plugins/impruver_searchpath``).
"""
