"""Command-line mistakes given to the launchers that take --config (launch.train, launch.plan)
end in one line on stderr, exit status 2, before anything heavy runs: no traceback."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


TRAIN = ("launch.train", "--config=configs/tiny.py", "--workdir=runs/never-written")
PLAN = ("launch.plan", "--config=configs/tiny.py", "--devices=1")


@pytest.mark.parametrize("command, override, expected", [
    (TRAIN, "--config.stepz=5",
     """error: --config.stepz=5: config has no field 'stepz'. Did you mean "steps" instead of """
     '"stepz"?'),
    (TRAIN, "--config.model.dimm=96",
     "error: --config.model.dimm=96: config.model has no field 'dimm'. Did you mean \"dim\" "
     'instead of "dimm"?'),
    (TRAIN, "--config.data.path.x=1",
     "error: --config.data.path.x=1: config.data.path is a str, not a group of fields"),
    (PLAN, "--config.mesh.dat=2",
     "error: --config.mesh.dat=2: config.mesh has no field 'dat'. Did you mean \"data\" "
     'instead of "dat"?'),
], ids=["train-stepz", "train-model.dimm", "train-under-a-str", "plan-mesh.dat"])
def test_misspelled_override_is_one_line_with_the_suggestion(command, override, expected):
    assert one_error_line(launch(*command, override)) == expected
    assert not os.path.exists(os.path.join(REPO, "runs", "never-written"))


@pytest.mark.parametrize("module, extra", [("launch.train", "--workdir=runs/never-written"),
                                           ("launch.plan", "--devices=1")])
def test_missing_config_file_is_one_line_naming_the_configs_there(module, extra):
    line = one_error_line(launch(module, "--config=configs/tiny_typo.py", extra))
    assert line.startswith("error: --config=configs/tiny_typo.py: no such file; configs/ has ")
    assert "tiny.py" in line and "__init__.py" not in line
    # with an override the load error surfaces while the override is resolved: the same line
    assert one_error_line(launch(module, "--config=configs/tiny_typo.py", extra,
                                 "--config.steps=3")) == line


def test_other_flag_errors_are_one_line_too():
    line = one_error_line(launch(*TRAIN, "--config.steps=abc"))
    assert line.startswith("error: flag --config.steps=abc: invalid literal for int()")
    line = one_error_line(launch("launch.train", "--config=configs/tiny.py"))
    assert "--workdir must have a value" in line


# The README's commands ---------------------------------------------------------------------------
def readme_commands() -> list[str]:
    """The README's shell command lines: its bash blocks, `$ ` example lines and inline
    `python -m ...` / `papermill ...` spans."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands, in_bash = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
        elif in_bash or line.startswith("$ "):
            commands.append(line.removeprefix("$ "))
        else:
            commands += re.findall(r"`((?:python|papermill) [^`]+)`", line)
    return commands


def test_readme_activates_the_venv_before_its_first_bare_python():
    commands = readme_commands()
    first = next(i for i, c in enumerate(commands) if re.match(r"\s*python\s", c))
    assert any(c.startswith("source .venv/bin/activate") for c in commands[:first]), commands[first]


def test_what_the_readme_examples_write_is_ignored_by_git():
    if subprocess.run(["git", "-C", REPO, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    outputs = set()
    for command in readme_commands():
        outputs.update(re.findall(r"--(?:out|workdir|output)=([^\s'\"\\]+)", command))
        outputs.update(re.findall(r">\s*([^\s'\"]+)\s*$", command))
        outputs.update(re.findall(r"papermill \S+ (\S+)", command))
    assert {"runs/tiny", "hf/tiny", "ckpt/v3", "prompts.txt", "out.ipynb"} <= outputs
    not_ignored = [path for path in sorted(outputs) if subprocess.run(
        ["git", "-C", REPO, "check-ignore", "-q", "--no-index", path]).returncode]
    assert not not_ignored
