"""The `impruver` command.

    impruver [overrides]                     the main job: compose the dataset if needed, then train
    impruver compose|train|chat|serve|export [overrides]    one stage
    impruver plan [--yaml] [--config FILE] [overrides]      print the validated plan (a dry run)
    impruver ls [KIND]                       presets, config-group options and registered components
    impruver cp PRESET DEST                  copy a preset to an editable file
    impruver run compose_dataset|finetune|chat --config PRESET_OR_FILE [overrides]   the older form

The main job and the stages are Hydra applications: --cfg job, --info, --help and -m (multirun) work on them.
Configuration errors are reported all at once with exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impruver.errors import ConfigError, ImpruverError, Problem, choices_hint
from impruver.ui import console, print_error, print_warning, setup_logging

STAGES = ("compose", "train", "chat", "serve", "export")
COMMANDS = (*STAGES, "plan", "ls", "cp", "run")
RECIPES = {"compose_dataset": "compose", "finetune": "main", "chat": "chat", "train": "main", "export": "export",
           "serve": "serve"}
# Hydra's own flags; those in the first set take a value.
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}
HYDRA_FLAGS = {"--multirun", "-m", "--run", "-r", "--help", "-h", "--hydra-help", "--resolve", "--version"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# impruver's own stage flags (name -> takes a value).
STAGE_FLAGS = {"--config": True, "--prompt": True, "--inspect": True, "--force": False, "--dest": True,
               "--yaml": False, "--report-to": True}
# The flags each stage takes (besides --config): its recipe's keyword arguments.
STAGE_OPTIONS = {"main": {"force"}, "train": {"force"}, "compose": {"force", "inspect"}, "chat": {"prompt"},
                 "serve": set(), "export": {"dest"}}


@dataclass
class Args:
    """A command line split into Hydra's flags, overrides and impruver's own flags."""

    hydra: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def multirun(self) -> bool:
        return any(a in ("-m", "--multirun") for a in self.hydra)

    @property
    def informational(self) -> bool:
        """Hydra prints help or info and runs nothing."""
        return any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc")
                   for a in self.hydra)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        code = dispatch(argv)
    except ImpruverError as exc:
        print_error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        print_error("interrupted")
        code = 130
    return code


def dispatch(argv: list[str]) -> int:
    command = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if command else argv
    if command == "ls":
        return cmd_ls(rest)
    if command == "cp":
        return cmd_cp(rest)
    if command == "plan":
        return cmd_plan(split_args(rest))
    if command == "run":
        return cmd_run(rest)
    return launch(command or "main", split_args(rest))


def split_args(argv: Sequence[str]) -> Args:
    """Sort a command line into Hydra flags, impruver flags (``--prompt x`` or ``--prompt=x``) and overrides."""
    args = Args()
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        if token.startswith("--") and name in STAGE_FLAGS:
            if STAGE_FLAGS[name]:
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError([Problem(name, "needs a value")])
                    i, value = i + 1, argv[i + 1]
                args.flags[name.lstrip("-").replace("-", "_")] = value
            else:
                args.flags[name.lstrip("-").replace("-", "_")] = True
        elif token in HYDRA_VALUE_FLAGS:
            args.hydra += argv[i:i + 2]
            i += 1
        elif token in ("--info", "-i"):
            args.hydra.append(token)
            if i + 1 < len(argv) and argv[i + 1] in INFO_VALUES:
                args.hydra.append(argv[i + 1])
                i += 1
        elif token in HYDRA_FLAGS or (token.startswith("-") and name in HYDRA_VALUE_FLAGS):
            args.hydra.append(token)
        elif token.startswith("-") and not token.startswith(("+", "~")):
            valid = sorted({*STAGE_FLAGS, *HYDRA_FLAGS, *HYDRA_VALUE_FLAGS, "--info"})
            raise ConfigError([Problem(token, f"unknown flag; {choices_hint(token, valid)}")])
        else:
            args.overrides.append(token)
        i += 1
    return args


# -- planning ------------------------------------------------------------------------------------------------


def config_source(args: Args) -> tuple[str | None, list[str]]:
    """``--config``: a preset name becomes ``preset=NAME``; a file becomes the primary config."""
    target = args.flags.get("config")
    if not target:
        return None, list(args.overrides)
    if Path(target).is_file():
        return str(target), list(args.overrides)
    from impruver.compose import list_options

    presets = list_options("preset")
    if target in presets:
        return None, [f"preset={target}", *args.overrides]
    raise ConfigError([Problem("--config", f"'{target}' is neither a file nor a preset; "
                               f"{choices_hint(target, presets)}")])


def plan_for(overrides: Sequence[str], config_file: str | None = None) -> Any:
    """compose -> make_plan, for one list of overrides."""
    return _composed_plan(overrides, config_file)[1]


def _composed_plan(overrides: Sequence[str], config_file: str | None) -> tuple[Any, Any]:
    from impruver.compose import compose
    from impruver.plan import make_plan

    composed = compose(overrides, config_file=config_file)
    try:
        return composed, make_plan(composed.config, choices=composed.choices)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=config_file) from None


def validate_all(overrides: Sequence[str], config_file: str | None, multirun: bool) -> tuple[Any, frozenset[str]]:
    """Plan every job a command would run (each sweep point under -m); report all problems at once.

    Returns the first job's plan and the overridden keys that the YAML does not name (Hydra needs ``++`` there).
    """
    from impruver.compose import expand_sweeps

    combos = expand_sweeps(overrides) if multirun else [list(overrides)]
    problems: list[Problem] = []
    first, added = None, frozenset()
    for combo in combos:
        try:
            composed, plan = _composed_plan(combo, config_file)
            first = first or plan
            added |= composed.added_keys
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems, source=config_file)
    return first, added


def cmd_plan(args: Args) -> int:
    from impruver.plan import environment_problems

    config_file, overrides = config_source(args)
    plan = plan_for(overrides, config_file)
    if args.flags.get("yaml"):
        console.print(plan.to_yaml(), end="", markup=False, highlight=False)
    else:
        from impruver.report import render_plan

        console.print(render_plan(plan))
    for problem in environment_problems(plan):
        print_warning(f"{problem} (this machine cannot run it as planned)")
    return 0


# -- running stages through Hydra ----------------------------------------------------------------------------


def launch(stage: str, args: Args) -> int:
    """Validate every job first, then hand the command line to Hydra, which calls the stage per job."""
    report_to = args.flags.pop("report_to", None) if stage in ("main", "train") else None
    if report_to:  # --report-to=wandb (the recipe catalogue's finetune flag) is train.report_to=[wandb]
        args.overrides.append(f"train.report_to=[{report_to}]")
    options = {k: v for k, v in args.flags.items() if k != "config"}
    unknown = sorted(set(options) - STAGE_OPTIONS[stage])
    if unknown:
        valid = sorted(f"--{o}" for o in STAGE_OPTIONS[stage] | {"config"})
        name = "impruver" if stage == "main" else f"impruver {stage}"
        raise ConfigError([Problem(f"--{o.replace('_', '-')}", f"{name} takes no such flag; valid: "
                                   f"{', '.join(valid)}") for o in unknown])
    config_file, overrides = config_source(args)
    extra: list[str] = ["hydra.run.dir=."]
    if not args.informational:
        first, added = validate_all(overrides, config_file, args.multirun)
        from impruver.compose import for_hydra

        overrides = for_hydra(overrides, added, config_file=config_file)
        if args.multirun:
            extra.append(f"hydra.sweep.dir={Path(first.output_dir, 'multirun').as_posix()}")
    import hydra

    from impruver.compose import CONFIG_MODULE, PRIMARY, hydra_settings

    config_path = f"pkg://{CONFIG_MODULE}"
    config_name = PRIMARY
    if config_file:
        config_path, config_name = str(Path(config_file).parent.resolve()), Path(config_file).stem
    task = _task(stage, options, config_file)
    saved = sys.argv
    sys.argv = ["impruver", *args.hydra, *hydra_settings(), *extra, *overrides]
    try:
        hydra.main(config_path=config_path, config_name=config_name, version_base="1.3")(task)()
    finally:
        sys.argv = saved
    return 0


def _task(stage: str, options: dict[str, Any], config_file: str | None) -> Callable[[Any], Any]:
    def impruver_job(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        from impruver.plan import make_plan

        hydra_cfg = HydraConfig.get()
        choices = {k: v for k, v in OmegaConf.to_container(hydra_cfg.runtime.choices).items()
                   if not k.startswith("hydra") and v is not None}
        try:
            plan = make_plan(OmegaConf.to_container(cfg, resolve=True), choices=choices)
            sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
            if sweep_job:
                # Each sweep point trains into its own folder; the composed data stays shared (cached by settings).
                plan = plan.model_copy(update={"output_dir": hydra_cfg.runtime.output_dir})
            result = run_stage(stage, plan, **options)
            if stage in ("main", "train"):
                write_run_summary(plan, result, list(hydra_cfg.overrides.task))
            return result
        except ImpruverError as exc:
            print_error(str(exc))
            sys.exit(exc.exit_code)

    return impruver_job


def run_stage(stage: str, plan: Any, **options: Any) -> Any:
    """See :func:`impruver.jobs.run_stage`."""
    from impruver.jobs import run_stage as run

    return run(stage, plan, **options)


def write_run_summary(plan: Any, result: Any, overrides: list[str]) -> None:
    """``run_summary.json`` in the output folder: what a sweep summary and people read back."""
    import json

    from impruver.files import atomic_write_text
    from impruver.sweep import RUN_SUMMARY

    record = {"overrides": overrides, "output_dir": plan.output_dir}
    if isinstance(result, dict):
        record.update({k: v for k, v in result.items() if isinstance(v, (int, float, str, bool, type(None)))})
    atomic_write_text(Path(plan.output_dir, RUN_SUMMARY), json.dumps(record, indent=2, ensure_ascii=False))


# -- the older form: impruver run RECIPE --config X --------------------------------------------------------


def cmd_run(argv: list[str]) -> int:
    if not argv or argv[0] not in RECIPES:
        given = argv[0] if argv else ""
        raise ConfigError([Problem("run", f"unknown recipe '{given}'; {choices_hint(given, RECIPES)}")])
    recipe, rest = argv[0], argv[1:]
    args = split_args(rest)
    if "config" not in args.flags and args.overrides and _looks_like_config(args.overrides[0]):
        args.flags["config"] = args.overrides.pop(0)  # impruver run chat ./my.yaml
    return launch(RECIPES[recipe], args)


def _looks_like_config(token: str) -> bool:
    return "=" not in token and (token.endswith((".yaml", ".yml")) or Path(token).is_file())


# -- ls and cp -----------------------------------------------------------------------------------------------


def cmd_ls(argv: list[str]) -> int:
    """``impruver ls`` (everything), ``impruver ls KIND`` (one registry or presets), ``impruver ls KIND NAME``."""
    from impruver import registry
    from impruver.report import render_listing

    words = [a for a in argv if not a.startswith("-")]
    if len(words) == 2 and words[0] in registry.KINDS:
        info = registry.describe(*words)
        where = f"{info['file']}:{info['line']}" if info["file"] else "(source not found)"
        console.print(f"[bold]{info['kind']}[/] [cyan]{info['name']}[/]  {where}\n\n{info['doc']}")
        return 0
    console.print(render_listing(words))
    return 0


def cmd_cp(argv: list[str]) -> int:
    if len(argv) != 2:
        raise ConfigError([Problem("cp", "usage: impruver cp PRESET DEST (impruver ls lists the presets)")])
    preset, dest = argv
    from impruver.compose import compose, list_options

    presets = list_options("preset")
    if preset not in presets:
        raise ConfigError([Problem("cp", f"no preset '{preset}'; {choices_hint(preset, presets)}")])
    target = Path(dest)
    if target.is_dir():
        target = target / (preset.replace("/", "_") + ".yaml")
    if target.exists():
        raise ConfigError([Problem("cp", f"{target} exists; remove it or choose another destination")])
    composed = compose([f"preset={preset}"])
    from impruver.report import config_file_text
    from impruver.files import atomic_write_text

    atomic_write_text(target, config_file_text(composed.config, preset=preset, dest=str(target)))
    console.print(f"copied preset {preset} to {target}\n  plan it:  impruver plan --config {target}\n"
                  f"  run it:   impruver run finetune --config {target}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
