"""Readable views of plans, listings and reports (rich renderables), and the text of copied config files."""

from __future__ import annotations

from typing import Any

import yaml
from rich.console import Group
from rich.table import Table
from rich.tree import Tree


def render_plan(plan: Any) -> Any:
    """A tree of the plan's sections, then the memory estimate."""
    data = plan.to_dict()
    title = f"[bold]plan[/] {plan.preset or ''}  ->  {plan.output_dir}"
    tree = Tree(title)
    for section, value in data.items():
        if section in ("version", "memory", "preset", "output_dir"):
            continue
        _add(tree, section, value)
    parts: list[Any] = [tree]
    from impruver import launch

    if launch.total_processes(plan) > 1:
        info = launch.describe(plan)
        parts.append(f"[bold]launch[/]: {info['processes']} processes on {info['machines']} machine(s), "
                     f"{info['sharding']}\n  {info['command']}")
    if plan.memory is not None:
        parts.append(render_memory(plan.memory, plan))
    return Group(*parts)


def _add(tree: Tree, key: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        branch = tree.add(f"[cyan]{key}[/]")
        for k, v in value.items():
            _add(branch, str(k), v)
    else:
        shown = "[]" if value == [] else "{}" if value == {} else value
        tree.add(f"[cyan]{key}[/]: {shown}")


def render_memory(memory: Any, plan: Any) -> Table:
    budget = f" of {memory.budget_gib:g} GiB ({plan.hardware.name})" if memory.budget_gib else ""
    verdict = "" if memory.fits is None else ("  [green]fits[/]" if memory.fits else "  [red]does not fit[/]")
    trainable = f", {memory.trainable_params:,} trainable parameters ({plan.method.builder})" \
        if memory.trainable_params is not None else ""
    table = Table(title=f"estimated peak GPU memory per device: {memory.total_gib:.1f} GiB{budget}{verdict}"
                        f"{trainable}",
                  title_justify="left")
    columns = ("weights", "gradients", "optimizer", "activations", "overhead")
    if getattr(memory, "reference_gib", 0):  # a reference model the objective holds (full-parameter DPO)
        columns = (*columns[:4], "reference", columns[4])
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*(f"{getattr(memory, f'{c}_gib'):.2f}" for c in columns))
    if memory.suggestions:
        table.caption = "would fit: " + " | ".join(memory.suggestions)
    return table


def render_listing(kinds: list[str]) -> Any:
    """Presets, config-group options and registered components, each with the package that provides it."""
    from impruver import registry
    from impruver.compose import list_options, option_providers

    parts: list[Any] = []
    want = set(kinds)
    if not want or "presets" in want or "preset" in want:
        table = Table(title="presets  (impruver preset=NAME, impruver cp NAME DEST)", title_justify="left")
        table.add_column("preset", style="cyan")
        for name in list_options("preset"):
            table.add_row(name)
        parts.append(table)
    if not want or "options" in want:
        table = Table(title="config-group options  (impruver GROUP=OPTION)", title_justify="left")
        table.add_column("group", style="cyan")
        table.add_column("options")
        for group in ("model", "tokenizer", "dataset", "method", "hardware", "train", "chat"):
            providers = option_providers(group)
            table.add_row(group, ", ".join(o if p == "impruver" else f"{o} ({p})" for o, p in providers.items()))
        parts.append(table)
    for kind in registry.KINDS:
        if want and kind not in want and kind.rstrip("s") not in want and "components" not in want:
            continue
        table = Table(title=f"{kind}", title_justify="left")
        table.add_column("name", style="cyan")
        table.add_column("package")
        for entry in registry.available(kind):
            table.add_row(entry.name, entry.provider)
        parts.append(table)
    errors = registry.load_plugins()
    if errors:
        table = Table(title="plugins that failed to load", title_justify="left")
        table.add_column("package", style="red")
        table.add_column("error")
        for dist, err in errors.items():
            table.add_row(dist, err)
        parts.append(table)
    return Group(*parts)


def config_file_text(config: dict[str, Any], *, preset: str, dest: str) -> str:
    """A standalone, editable config file holding every key of a composed preset."""
    body = dict(config)
    body["preset"] = preset
    header = (
        f"# Copied from impruver preset {preset}: every key, ready to edit.\n"
        f"#   impruver plan --config {dest}                 # check it\n"
        f"#   impruver run finetune --config {dest}         # run it (or: impruver --config {dest})\n"
        f"#   impruver run chat {dest}                      # talk to the result\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=120)


# -- the end of a run -----------------------------------------------------------------------------------------


def data_notes(report: dict[str, Any], plan: Any) -> list[str]:
    """What composition left out of the training data, per source, with counts and the setting that keeps it:
    nothing dropped goes unmentioned in the main job's log (the compose report has the details)."""
    settings = report.get("settings", {})
    max_tokens = settings.get("max_tokens", plan.max_tokens)
    notes = []
    for name, row in report.get("sources", {}).items():
        loaded = row.get("loaded") or 0
        if not loaded:
            continue

        def share(n: int) -> str:
            return f"{n} of {loaded} records ({n / loaded:.0%})"

        too_long = row.get("too_long", 0)
        if too_long:
            room = (f"raise dataset.max_tokens (up to the model's context, {plan.context_length} tokens)"
                    if max_tokens < plan.context_length else
                    f"choose a model with a longer context than {plan.context_length} tokens")
            notes.append(f"{name}: {share(too_long)} dropped as longer than {max_tokens} tokens; to keep them, "
                         f"{room}, or cut them to fit with dataset.length_policy=truncate")
        invalid = sum(row.get("invalid", {}).values())
        if invalid:
            notes.append(f"{name}: {share(invalid)} invalid, skipped by dataset.on_error=skip "
                         f"({_reasons(row['invalid'])}); dataset.on_error=raise names each with its file and line")
        skipped = sum(row.get("skipped", {}).values()) + row.get("no_trainable", 0)
        if skipped:
            reasons = {**row.get("skipped", {}), **({"nothing to train on": row["no_trainable"]}
                                                     if row.get("no_trainable") else {})}
            notes.append(f"{name}: {share(skipped)} skipped ({_reasons(reasons)})")
        duplicates = row.get("duplicates", 0)
        if duplicates:
            notes.append(f"{name}: {share(duplicates)} dropped as duplicates of others (dataset.dedup.near=false "
                         f"keeps near-duplicates, dataset.dedup.exact=false exact ones)")
    return notes


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counts.items())


def render_next(steps: list[tuple[str, str]]) -> str:
    """The commands to run next, aligned, each with what it does."""
    width = max(len(cmd) for cmd, _ in steps)
    return "next:\n" + "\n".join(f"  {cmd.ljust(width)}   # {what}" for cmd, what in steps)
