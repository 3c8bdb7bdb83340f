"""The `impruver` command.

    impruver [overrides]                     the main job: compose the dataset if needed, then train
    impruver compose|train|chat|serve|export [overrides]    one stage
    impruver plan [--yaml] [--config FILE] [overrides]      print the validated plan (a dry run)
    impruver ls [KIND]                       presets, config-group options and registered components
    impruver cp PRESET DEST                  copy a preset to an editable file
    impruver download REPO [--repo-type model|dataset] [--dest DIR] [--revision R]   fetch from the Hub
    impruver run compose_dataset|finetune|chat --config PRESET_OR_FILE [overrides]   the older form

The main job and the stages are Hydra applications: --cfg job, --info, --help, -m (multirun) with
hydra/launcher=... and hydra/sweeper=..., and shell completion (-sc) work on them; --version prints impruver's
version and its dependencies'. Each stage's flags are its run function's keyword-only parameters.
Configuration errors are reported all at once with exit status 2, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from impruver.commands import LATER_STAGES, Invocation, set_current
from impruver.errors import ConfigError, ImpruverError, Problem, choices_hint, closest
from impruver.jobs import STAGES  # light: the stage functions are imported only when they run
from impruver.ui import console, print_error, print_warning, setup_logging

COMMANDS = (*STAGES, "plan", "ls", "cp", "run", "download")
RECIPES = {"compose_dataset": "compose", "finetune": "main", "chat": "chat", "train": "main", "export": "export",
           "serve": "serve"}
# Hydra's own flags; those in the first set take a value.
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
HYDRA_FLAGS = {"--multirun", "-m", "--run", "-r", "--help", "-h", "--hydra-help", "--resolve", "--shell-completion",
               "-sc"}
INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
# impruver's flags besides the stages' own (which come from their run functions' signatures): name -> takes a
# value. --report-to (the recipe catalogue's finetune flag) is train.report_to=[X] for the training stages.
COMMON_FLAGS = {"config": True, "plan": True}  # --plan FILE: run a frozen plan.yaml exactly (no composition)
COMMAND_FLAGS = {"plan": {"yaml": False}, "main": {"report_to": True}, "train": {"report_to": True}}
# Whose versions --version prints beside impruver's.
DEPENDENCIES = ("torch", "transformers", "peft", "accelerate", "datasets", "hydra-core")


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
        """Hydra prints help, info, a config or completions and runs nothing."""
        return any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--cfg", "-c")
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
    if "--version" in argv:
        return cmd_version()
    command = argv[0] if argv and argv[0] in COMMANDS else None
    rest = argv[1:] if command else argv
    if command == "ls":
        return cmd_ls(rest)
    if command == "cp":
        return cmd_cp(rest)
    if command == "plan":
        return cmd_plan(split_args(rest, "plan"))
    if command == "run":
        return cmd_run(rest)
    if command == "download":
        from impruver.download import main as download

        return download(rest)
    return launch(command or "main", split_args(rest, command or "main"))


def cmd_version() -> int:
    """impruver's version and its main dependencies', read from the installed metadata (no torch import)."""
    from importlib.metadata import PackageNotFoundError, version

    from impruver import __version__

    lines = [f"impruver {__version__}"]
    for name in DEPENDENCIES:
        try:
            lines.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    lines.append(f"python {sys.version.split()[0]}")
    console.print("\n".join(lines), markup=False, highlight=False)
    return 0


def command_flags(command: str) -> dict[str, bool]:
    """The flags ``impruver COMMAND`` takes (name -> takes a value): its stage function's, plus the common ones."""
    from impruver.jobs import stage_flags

    own = {} if command == "plan" else stage_flags(command)
    return {**COMMON_FLAGS, **COMMAND_FLAGS.get(command, {}), **own}


def split_args(argv: Sequence[str], command: str) -> Args:
    """Sort a command line into Hydra flags, the command's flags (``--prompt x`` or ``--prompt=x``) and overrides."""
    flags = command_flags(command)
    args = Args()
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        flag = name[2:].replace("-", "_") if name.startswith("--") else None
        if flag in flags:
            if flags[flag]:
                if not eq:
                    if i + 1 >= len(argv):
                        raise ConfigError([Problem(name, "needs a value")])
                    i, value = i + 1, argv[i + 1]
                args.flags[flag] = value
            else:
                args.flags[flag] = True
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
            raise ConfigError([_unknown_flag(token, command, flags)])
        else:
            args.overrides.append(token)
        i += 1
    return args


def _unknown_flag(token: str, command: str, flags: dict[str, bool]) -> Problem:
    """A flag the command does not take: another command's (name it) or a typo (the closest of all flags)."""
    name = "impruver" if command == "main" else f"impruver {command}"
    valid = sorted(f"--{f.replace('_', '-')}" for f in flags)
    flag = token.partition("=")[0]
    near = closest(flag, valid)
    guess = f"did you mean {near[0]}? " if near else ""
    other = flag if _takers(flag, command) else (closest(flag, _all_flags()) or [""])[0]
    if other and not (near and other != flag):  # the flag of another command, or a typo of one
        owners = ", ".join("impruver" if c == "main" else f"impruver {c}" for c in _takers(other, command))
        guess = f"{other} is a flag of {owners}; " if other == flag else f"did you mean {other} (of {owners})? "
    return Problem(flag, f"{name} takes no such flag; {guess}{name} takes: {', '.join(valid)} "
                         f"(and Hydra's flags: impruver --hydra-help)")


def _takers(flag: str, command: str) -> list[str]:
    """The other commands that take ``flag``."""
    name = flag[2:].replace("-", "_")
    return [c for c in ("main", "plan", *STAGES) if c != command and name in command_flags(c)]


def _all_flags() -> list[str]:
    return sorted({f"--{f.replace('_', '-')}" for c in ("main", "plan", *STAGES) for f in command_flags(c)})


# -- planning ------------------------------------------------------------------------------------------------


def config_source(args: Args) -> tuple[str | None, list[str]]:
    """``--config``: a preset name becomes ``preset=NAME``; a file becomes the primary config."""
    target = args.flags.get("config")
    if not target:
        return None, list(args.overrides)
    if Path(target).is_file():
        if _is_frozen_plan(Path(target)):
            raise ConfigError([Problem("--config", f"{target} is a frozen plan (a run's plan.yaml), not a config: "
                                       f"run it as it is with `impruver train --plan {target}`")])
        return str(target), list(args.overrides)
    from impruver.compose import list_options

    presets = list_options("preset")
    if target in presets:
        return None, [f"preset={target}", *args.overrides]
    raise ConfigError([Problem("--config", f"'{target}' is neither a file nor a preset; "
                               f"{choices_hint(target, presets)}")])


def _is_frozen_plan(path: Path) -> bool:
    """A plan.yaml impruver wrote: it records the plan version and the composed data's paths."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # the config reader reports what is wrong with it
    return isinstance(data, dict) and {"version", "train_path", "val_path"} <= data.keys()


def cmd_plan(args: Args) -> int:
    from impruver.compose import plan_job
    from impruver.plan import environment_problems

    if "plan" in args.flags:  # check and show a frozen plan file
        from impruver.plan import load_plan

        plan = load_plan(args.flags["plan"])
    else:
        config_file, overrides = config_source(args)
        plan = plan_job(overrides, config_file=config_file)
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
    """Check the configs are safe and every listable job plans, then hand the command line to Hydra, which
    calls the stage once per job with its plan (impruver.compose.make_job -> impruver.jobs.run_job)."""
    from impruver import compose as hydra_side

    report_to = args.flags.pop("report_to", None)
    if report_to:
        args.overrides.append(f"train.report_to=[{report_to}]")
    if "plan" in args.flags:
        return run_frozen_plan(stage, args)
    flags = {k: v for k, v in args.flags.items() if k != "config"}
    config_file, overrides = config_source(args)
    problems = hydra_side.check_safe(overrides, config_file)
    if problems:
        raise ConfigError(problems, source=config_file)
    if _completing(args):
        return _complete(stage, args, config_file)
    _check_one_mode(args)
    config_file, overrides = _later_stage_source(stage, args, config_file, overrides)
    invocation = Invocation(config_file, tuple(overrides),
                            pinned=not hydra_side.default_preset_applies(overrides, config_file))
    set_current(invocation)
    overrides = hydra_side.hydra_overrides(overrides, config_file=config_file)
    settings = [*hydra_side.hydra_settings(), "hydra.run.dir=."]
    checked, sweep_dir = hydra_side.Precheck(), None
    if not args.informational:
        checked = hydra_side.precheck(overrides, config_file, multirun=args.multirun)
        if args.multirun:
            sweep_dir = _start_sweep(stage, checked)
            settings.append(f"hydra.sweep.dir={sweep_dir.as_posix()}")
    job = hydra_side.make_job(stage, flags, checked, config_file, _job_runner(invocation, args.multirun))
    hydra_side.run_hydra(job, config_file=config_file, argv=_hydra_argv(args, [*settings, *overrides]))
    if sweep_dir is not None and sweep_dir.is_dir():
        _summarize(sweep_dir)
    return 0


def run_frozen_plan(stage: str, args: Args) -> int:
    """``--plan FILE``: run the plan as written (validated by the schema, never composed again), so a run can be
    repeated exactly from its ``<output_dir>/plan.yaml`` or from an edited copy of it."""
    from impruver.jobs import run_job
    from impruver.plan import load_plan

    path = args.flags["plan"]
    if args.overrides or args.hydra or "config" in args.flags:
        extra = " ".join([*args.hydra, *(["--config"] if "config" in args.flags else []), *args.overrides])
        raise ConfigError([Problem("--plan", f"runs {path} exactly, so it takes no overrides, --config or Hydra "
                                   f"flags (got: {extra}); edit the file, or plan again with them: "
                                   "impruver plan --yaml OVERRIDES > FILE")])
    plan = load_plan(path)
    flags = {k: v for k, v in args.flags.items() if k not in ("config", "plan")}
    run_job(stage, plan, [f"--plan={path}"], **flags)
    return 0


TRAINING_STAGES = ("main", "train")


def _later_stage_source(stage: str, args: Args, config_file: str | None,
                        overrides: list[str]) -> tuple[str | None, list[str]]:
    """``impruver chat`` (no recipe, no output_dir): the last run's config file and overrides, saying so."""
    from impruver import compose as hydra_side
    from impruver.commands import reuse_last_run

    if (stage not in LATER_STAGES or args.informational or args.multirun
            or not hydra_side.default_preset_applies(overrides, config_file) or _names_output_dir(overrides)):
        return config_file, overrides
    reused = reuse_last_run(overrides)
    if reused is None:
        return config_file, overrides
    config_file, overrides, note = reused
    console.print(note, markup=False, highlight=False)
    return config_file, overrides


def _names_output_dir(overrides: Sequence[str]) -> bool:
    from impruver.compose import parse_overrides

    parsed, _ = parse_overrides(overrides)
    return any(o.get_key_element().lstrip("+~") == "output_dir" for o in parsed)


def _job_runner(invocation: Invocation, multirun: bool) -> Any:
    """run_job, plus for a training job on its own (not a sweep's point, not a worker rank): the record of
    the last run before it trains, and after it what was left out of the data and the next commands."""
    from impruver.jobs import run_job
    from impruver.ui import is_main_process

    def run(stage: str, plan: Any, overrides: list[str], **flags: Any) -> Any:
        if not (stage in TRAINING_STAGES and not multirun and is_main_process()):
            return run_job(stage, plan, overrides, **flags)
        from impruver.commands import recording_last_run

        with recording_last_run(plan.output_dir, invocation):
            result = run_job(stage, plan, overrides, **flags)
        _after_training(plan, invocation)
        return result

    return run


def _after_training(plan: Any, invocation: Invocation) -> None:
    """What composition left out (counts and the setting that keeps it), then the commands to run next."""
    import json

    from impruver.commands import next_commands
    from impruver.data.pipeline import paths_of
    from impruver.report import data_notes, render_next

    try:
        report = json.loads(paths_of(plan)["report"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = {}
    for note in data_notes(report, plan):
        print_warning(note)
    console.print(render_next(next_commands(plan, invocation)), markup=False, highlight=False)


# Hydra's modes: one per command line (Hydra itself would end in a ValueError traceback).
MODES = {"-m": "multirun", "--multirun": "multirun", "--cfg": "cfg", "-c": "cfg", "--info": "info", "-i": "info",
         "--run": "run", "-r": "run"}


def _check_one_mode(args: Args) -> None:
    modes = [a for a in args.hydra if a in MODES]
    if len({MODES[m] for m in modes}) > 1:
        raise ConfigError([Problem(" ".join(modes), "Hydra runs one of --run, --multirun, --cfg, --info at a time")])


def _start_sweep(stage: str, checked: Any) -> Path:
    """The sweep's own folder; for training, the data of its listed points composed once, before jobs start."""
    from impruver.jobs import prepare_sweep

    sweep_dir = _new_sweep_dir(checked.plans[0][2].output_dir)
    if stage in ("main", "train") and checked.listable:
        prepare_sweep([plan for _, _, plan in checked.plans])
    return sweep_dir


def _hydra_argv(args: Args, overrides: list[str]) -> list[str]:
    """Hydra's flags, then the overrides; ``--info [WORD]`` last, where its optional word cannot swallow an
    override (``--info hydra/job_logging=none`` is argparse's "invalid choice")."""
    info = [i for i, a in enumerate(args.hydra) if a in ("--info", "-i")]
    cut = info[0] if info else len(args.hydra)
    return [*args.hydra[:cut], *overrides, *args.hydra[cut:]]


def _new_sweep_dir(output_dir: str) -> Path:
    """A folder of its own for this sweep under ``<output_dir>/multirun``, named by the time it started."""
    import time

    from impruver.layout import RunLayout

    root = RunLayout.of(output_dir).multirun
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    candidate, n = root / stamp, 1
    while candidate.exists():
        n += 1
        candidate = root / f"{stamp}-{n}"
    return candidate


def _summarize(sweep_dir: Path) -> None:
    from impruver.layout import SWEEP_SUMMARY
    from impruver.sweep import render, write_summary

    summary = write_summary(sweep_dir)
    console.print(render(summary))
    console.print(f"summary written to {sweep_dir / SWEEP_SUMMARY}", markup=False)


def _completing(args: Args) -> bool:
    return any(a in ("-sc", "--shell-completion") for a in args.hydra)


def _complete(stage: str, args: Args, config_file: str | None) -> int:
    """Hydra's shell completion; the words it completes are overrides, so a stage word is taken out first."""
    import os

    from impruver import compose as hydra_side

    if "COMP_LINE" in os.environ:
        os.environ["COMP_LINE"] = hydra_side.completion_line(os.environ["COMP_LINE"], STAGES)
    job = hydra_side.make_job(stage, {}, hydra_side.Precheck(), config_file, lambda *a, **k: None)
    hydra_side.run_hydra(job, config_file=config_file, argv=[*args.hydra, *args.overrides])
    return 0


# -- the older form: impruver run RECIPE --config X --------------------------------------------------------


def cmd_run(argv: list[str]) -> int:
    if not argv or argv[0] not in RECIPES:
        given = argv[0] if argv else ""
        raise ConfigError([Problem("run", f"unknown recipe '{given}'; {choices_hint(given, RECIPES)}")])
    recipe, rest = argv[0], argv[1:]
    args = split_args(rest, RECIPES[recipe])
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
