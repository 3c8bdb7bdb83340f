"""The first hour of a new user, through the real `impruver` command: the demo stays the demo when only the machine
changes (two CPU processes train it to the same loss as one), `impruver chat` finds what the last run trained,
`data=FILE` trains on that file alone, and every command impruver suggests works as printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ALPACA = "alpaca/llamafactory_identity.json"  # 91 short alpaca records; 12 are longer than 48 tokens
QUIET = ["train.logging_steps=1", "train.eval_steps=1000", "train.save_steps=1000", "eval.questions=null"]


def impruver(*args: str, cwd: Path, ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop("LOCAL_RANK", None)
    done = subprocess.run([sys.executable, "-m", "impruver", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def as_printed(line: str) -> list[str]:
    """A command impruver printed, as the shell would split it, without the leading `impruver`."""
    words = shlex.split(line.split("   #")[0])
    assert words[0] == "impruver", line
    return words[1:]


def next_commands(output: str) -> dict[str, list[str]]:
    """The `next:` block a training run ends with: stage -> its arguments."""
    block = output.split("next:\n", 1)[1]
    found = {}
    for line in block.splitlines():
        if not line.startswith("  impruver "):
            break
        words = as_printed(line.strip())
        found[words[0]] = words[1:]
    return found


def in_process(*args: str, cwd: Path) -> tuple[int, str, str]:
    """``impruver ARGS`` in this process (for commands that only plan: no second torch import)."""
    from impruver import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def planned(args: list[str], cwd: Path) -> dict:
    code, out, err = in_process("plan", "--yaml", *args, cwd=cwd)
    assert code == 0, err
    return yaml.safe_load(out)


def train_losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo trained twice for two steps with the same global batch of 8 rows: one process with the preset
    named, then two CPU processes naming only the hardware, in a fresh folder (as a user would type it)."""
    cwd = tmp_path_factory.mktemp("first-hour")
    data = [f"train_path={cwd / 'data' / 'train.jsonl'}", f"val_path={cwd / 'data' / 'val.jsonl'}"]
    steps = ["train.max_steps=2", *QUIET, *data]
    impruver("preset=demo", "train.batch_size=8", *steps, f"output_dir={cwd / 'single'}", cwd=cwd)
    ddp = impruver("hardware=cpu_ddp", "hardware.num_processes=2", f"hardware.main_process_port={free_port()}",
                   "train.batch_size=4", *steps, cwd=cwd)
    return {"cwd": cwd, "single": cwd / "single", "ddp": ddp}


def test_naming_the_hardware_still_trains_the_demo_to_the_same_loss(demo_runs: dict) -> None:
    demo = demo_runs["cwd"] / "outputs" / "demo"  # the demo's own folder, not outputs/tiny_scratch_demo
    assert (demo / "model.safetensors").is_file()
    assert not (demo_runs["cwd"] / "outputs" / "tiny_scratch_demo").exists()
    assert yaml.safe_load((demo / "plan.yaml").read_text())["preset"] == "demo"
    single, ddp = train_losses(demo_runs["single"]), train_losses(demo)
    assert len(ddp) == 2 and ddp == pytest.approx(single, rel=1e-4)
    assert "2 process(es)" in demo_runs["ddp"].stderr


def test_chat_without_arguments_answers_from_the_last_run(demo_runs: dict) -> None:
    done = impruver("chat", "--prompt", "Сколько будет 2 + 3?", "chat.max_new_tokens=8", cwd=demo_runs["cwd"])
    assert "using outputs/demo, what the last run trained" in done.stdout
    record = json.loads((demo_runs["cwd"] / "outputs" / ".last_run.json").read_text())
    assert record["output_dir"] == "outputs/demo" and "hardware=cpu_ddp" in record["overrides"]


def test_the_next_commands_a_run_ends_with_work_as_printed(demo_runs: dict) -> None:
    cwd = demo_runs["cwd"]
    steps = next_commands(demo_runs["ddp"].stdout)
    assert set(steps) == {"chat", "serve"}  # a full model: nothing to export (merge)
    assert "output_dir=outputs/demo" in steps["chat"]  # names the run, whatever trains later
    for stage in ("chat", "serve"):  # they plan to that folder (chat itself talks to it in the test above)
        assert planned(steps[stage], cwd)["output_dir"] == "outputs/demo"
    code, out, _ = in_process("chat", *steps["chat"], "--cfg", "job", cwd=cwd)  # the stage takes the arguments
    assert code == 0 and yaml.safe_load(out)["output_dir"] == "outputs/demo"


def test_data_path_trains_on_that_file_alone(tmp_path: Path, shared_data: Path) -> None:
    cwd = tmp_path
    source = shared_data / ALPACA
    done = impruver(f"data={source}", "dataset.max_tokens=48", "train.max_steps=1", *QUIET[:3], cwd=cwd)
    out = cwd / "outputs" / source.stem
    report = json.loads((out / "data" / "compose_report.json").read_text())
    assert list(report["sources"]) == [source.stem]  # the file alone: no demo chats
    row = report["sources"][source.stem]
    assert row["format"].startswith("instruct (detected") and row["loaded"] == 91
    assert row["too_long"] > 0 and row["kept"] == 91 - row["too_long"] - row["duplicates"]
    log = " ".join((done.stdout + done.stderr).split())
    assert "format auto -> instruct" in log
    assert f"{row['too_long']} of 91 records" in log and "dataset.length_policy=truncate" in log
    plan = yaml.safe_load((out / "plan.yaml").read_text())
    assert plan["model"]["arch"]["n_layer"] == 4 and plan["method"]["builder"] == "scratch"  # the demo's model
    assert plan["dataset"]["val_size"] is None and plan["eval"]["questions"] is None
    steps = next_commands(done.stdout)
    assert steps["chat"] == [f"data={source}", "dataset.max_tokens=48"]
    assert planned(steps["chat"], cwd)["output_dir"] == f"outputs/{source.stem}"


def test_train_first_suggestion_names_the_same_recipe(tmp_path: Path) -> None:
    """`impruver run chat ./my.yaml` on a preset not trained yet suggests a train command for that file, not the
    demo's model in the 13B preset's folder."""
    assert in_process("cp", "ruGPT-3.5/13B_lora_saiga2", "my.yaml", cwd=tmp_path)[0] == 0
    done = impruver("run", "chat", "./my.yaml", cwd=tmp_path, ok=False)  # the real command line, end to end
    assert done.returncode == 2 and "Traceback" not in done.stderr
    folder = re.search(r"error: (\S+) does not exist", done.stderr)[1]
    suggested = as_printed(re.search(r"Train one first: `([^`]+)`", " ".join(done.stderr.split()))[1])
    assert suggested[0] == "train"
    plan = planned(suggested[1:], tmp_path)
    assert plan["output_dir"] == folder and plan["model"]["path"] == "ai-forever/ruGPT-3.5-13B"


def test_a_run_that_fails_before_writing_anything_is_not_the_last_run(tmp_path: Path, monkeypatch) -> None:
    """The record of the last run is written before training (so a killed run is found); a run that fails leaving
    no folder puts back the record it replaced; one that leaves its folder (checkpoints to resume) keeps its own."""
    from impruver.commands import LAST_RUN, Invocation, last_run, recording_last_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "good").mkdir(parents=True)
    previous = Invocation(overrides=("output_dir=outputs/good",))
    with recording_last_run("outputs/good", previous):
        pass
    with pytest.raises(RuntimeError), recording_last_run("outputs/bad", Invocation(overrides=("data=x.jsonl",))):
        raise RuntimeError("failed before writing anything")
    assert last_run().output_dir == "outputs/good"
    with pytest.raises(RuntimeError), recording_last_run("outputs/good", Invocation(overrides=("train.lr=1",))):
        raise RuntimeError("failed after writing checkpoints")
    assert last_run().overrides == ["train.lr=1"] and LAST_RUN.is_file()


def test_a_preference_preset_before_its_sft_run_says_which_run_to_train(tmp_path: Path) -> None:
    """`impruver preset=demo objective=dpo` in a fresh folder: outputs/demo (its starting point) is the demo's run
    folder, not a Hub id to download; every missing local path is named at once, and nothing is left behind."""
    (tmp_path / "x.jsonl").write_text("")
    done = impruver("preset=demo", "objective=dpo", "data=missing.jsonl", cwd=tmp_path, ok=False)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in message, message
    assert "model.path: no file or folder at outputs/demo: it is the folder `impruver preset=demo` trains" in message
    assert "dataset.sources.missing.path: no file or folder at missing.jsonl" in message
    assert "hf download" not in message  # not a Hub id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jsonl"]


def test_a_killed_run_is_told_apart_from_a_running_one(tmp_path: Path) -> None:
    """After `kill -9` chat suggests resuming (its lock names a dead pid); a live run's lock says "writing it"."""
    from impruver.chat.load import locate
    from impruver.commands import Invocation, set_current
    from impruver.errors import RunError

    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    (out / "checkpoints" / "step-00000004" / "state.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")  # just written: without a lock this looked "in progress"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.kill()
    victim.wait()
    host = socket.gethostname()
    set_current(Invocation(overrides=(f"output_dir={out}",), pinned=True))
    try:
        (out / ".lock").write_text(json.dumps({"pid": victim.pid, "host": host, "started": 0}))
        with pytest.raises(RunError) as dead:
            locate(out)
        assert "no longer running" in str(dead.value) and "in progress" not in str(dead.value)
        resume = re.search(r"with `([^`]+)`", str(dead.value))[1]
        assert as_printed(resume) == ["train", f"output_dir={out}", "train.resume=auto"]
        (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": host, "started": 0}))
        with pytest.raises(RunError, match="writing it now"):
            locate(out)
    finally:
        set_current(Invocation())
    assert planned(["output_dir=x", "train.resume=auto"], tmp_path)["train"]["resume"] == "auto"


@pytest.mark.parametrize(("args", "expected"), [
    (["plan", "metod=lora"], "did you mean method=lora?"),
    (["eval", "--bogus"], "impruver eval takes: --config, "),
    (["plan", "dataset.sources.x.path=/tmp/мои", "данные.jsonl"],
     "\"dataset.sources.x.path='/tmp/мои данные.jsonl'\""),
])
def test_mistakes_get_the_fix(tmp_path: Path, args: list[str], expected: str) -> None:
    code, _, err = in_process(*args, cwd=tmp_path)  # an uncaught error would raise here: no traceback for users
    assert code == 2
    message = " ".join(err.split())
    assert expected in message and "+metod" not in message and "--prompt" not in message


def test_a_config_file_takes_the_fix_impruver_suggests(tmp_path: Path) -> None:
    """qlora without a GPU says "use method=lora"; a copied preset file then takes exactly that."""
    assert in_process("cp", "ruGPT-3.5/13B_lora_saiga2", "my.yaml", cwd=tmp_path)[0] == 0
    code, _, err = in_process("plan", "--config", "my.yaml", "hardware=cpu", cwd=tmp_path)
    assert code == 2 and "use method=lora" in err
    plan = planned(["--config", "my.yaml", "hardware=cpu", "method=lora"], tmp_path)
    assert plan["method"]["builder"] == "lora" and "quantization" not in plan["method"]
    assert plan["hardware"]["name"] == "cpu" and plan["model"]["path"] == "ai-forever/ruGPT-3.5-13B"


def test_a_benchmark_too_big_for_the_machine_is_refused_with_a_message(tmp_path: Path) -> None:
    bench = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    done = subprocess.run([sys.executable, str(bench), "--shape", "gpt2-124m", "--memory-gib", "8"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and not done.stdout
    assert "--shape gpt2-124m does not fit this machine" in done.stderr and "--rows" in done.stderr


def test_a_benchmark_side_killed_for_memory_says_so() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._how(-9) == "killed by SIGKILL: most likely out of memory (the kernel's OOM killer); try fewer --rows"
    assert bench._output(subprocess.CompletedProcess([], -9, "\n", "\n\n")) == "it printed nothing"
