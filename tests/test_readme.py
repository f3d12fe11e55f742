"""Every command the README shows must work as written: its program exists and accepts the flags shown.

The demo and the test command themselves are exercised by test_e2e.py (the demo) and by CI (the tests);
here each shell line of the README's ``sh`` blocks is checked against the real program's ``--help``.
"""

from __future__ import annotations

import functools
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Program (as written in the README) -> how to run it here.
PROGRAMS: dict[str, list[str]] = {
    "lookaside-server": [sys.executable, "-m", "lookaside_server"],
    "lookaside": [sys.executable, "-m", "lookaside_grpc"],
    "lookaside-demo": [sys.executable, "-m", "examples.demo"],
    "lookaside-gateway": [sys.executable, "-m", "examples.gateway"],
}
MODULES = {
    "lookaside_server": "lookaside_server",
    "lookaside_grpc": "lookaside_grpc",
    "examples.greet.server": "examples.greet.server",
    "examples.greet.client": "examples.greet.client",
    "examples.gateway": "examples.gateway",
    "examples.demo": "examples.demo",
    "benchmarks": "benchmarks",
}


def readme_commands() -> list[str]:
    """Shell lines of the README's ```sh blocks, without prompts, comments and continuation lines."""
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"^\$ ", "", line.split("  #")[0].split(" # ")[0]).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@functools.cache
def help_text(argv: tuple[str, ...]) -> str:
    out = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, f"{argv} --help failed: {out.stderr}"
    return out.stdout


def check_flags(argv: list[str], words: list[str]) -> None:
    """Every ``--flag`` in ``words`` (and a leading subcommand) must be known to the program's --help."""
    subcommand = [w for w in words[:1] if not w.startswith("-") and w.isidentifier()]
    text = help_text(tuple(argv + subcommand))
    for word in words:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert re.search(rf"{re.escape(flag)}\b", text), f"{flag} not in `{' '.join(argv)} --help`"


def check(command: str) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # leading VAR=value assignments
        words = words[1:]
    program, args = words[0], words[1:]
    if program == "python3" and args[:1] == ["dev.py"]:
        assert args[1] in {"demo", "test", "test-floor", "lint", "proto", "bench"}, command
        if args[1] == "bench":
            check_flags([sys.executable, "-m", "benchmarks", "run"], args[2:])
    elif program in ("python", "python3") and args[:1] == ["-m"]:
        module = MODULES.get(args[1])
        assert module, f"README runs an unknown module: {command}"
        check_flags([sys.executable, "-m", module], args[2:])
    elif program in PROGRAMS:
        check_flags(PROGRAMS[program], args)
    elif program == "kubectl":
        target = args[args.index("-k") + 1]
        assert (ROOT / target / "kustomization.yaml").exists(), command
    elif program == "docker":
        assert (ROOT / args[args.index("-f") + 1]).exists(), command
    elif program in {"grpcurl", "curl", "export", "cd", "git"}:
        pass  # third-party tools talking to a running server; not ours to check here
    else:
        pytest.fail(f"README command with no check: {command}")


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command: str) -> None:
    check(command)


def test_first_screen_has_the_two_commands() -> None:
    first_screen = "\n".join(README.read_text().splitlines()[:25])
    assert "python3 dev.py demo" in first_screen and "python3 dev.py test" in first_screen
    assert "python3 dev.py test" in (ROOT / ".ci" / "run").read_text()
