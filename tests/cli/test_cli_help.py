"""What a newcomer reads: every command and option of liveupdatectl, luo-agent and luo-emukernel
explains itself in --help, the descriptions say what each command does for its user, and
--version answers as systemctl's does."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from luo_agent import __version__, cli, daemon
from luo_agent.kernel.emulator import __main__ as emukernel

REPO = Path(__file__).resolve().parents[2]
PARSERS = {
    "liveupdatectl": cli.parser,
    "luo-agent": daemon.parser,
    "luo-emukernel": emukernel.parser,
}
MODULES = {
    "liveupdatectl": "luo_agent.cli",
    "luo-agent": "luo_agent",
    "luo-emukernel": "luo_agent.kernel.emulator",
}


def undocumented(parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Options, arguments and subcommands without a help text of their own."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name) or helps[name] == name:
                    missing.append(f"{where} {name}")
                missing += undocumented(sub, f"{where} {name}")
        elif action.help is None or (action.help != argparse.SUPPRESS and not action.help.strip()):
            missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("program", PARSERS)
def test_every_command_and_option_has_help(program: str) -> None:
    assert undocumented(PARSERS[program](), program) == []


def test_the_checker_finds_an_option_without_help() -> None:
    parser = cli.parser()
    parser.add_argument("--silent")
    assert undocumented(parser, "liveupdatectl") == ["liveupdatectl --silent"]


def run(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", MODULES[program], *args],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "1000"},  # one line per paragraph: argparse wraps at hyphens
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("program", ["liveupdatectl", "luo-agent"])
def test_version(program: str) -> None:
    proc = run(program, "--version")
    assert (proc.returncode, proc.stdout) == (0, f"{program} {__version__}\n")


def test_help_says_what_each_program_does_for_its_user() -> None:
    ctl = run("liveupdatectl", "--help")
    assert ctl.returncode == 0
    assert "Drive Linux live updates through luo-agent" in ctl.stdout
    for name in cli.COMMANDS:
        assert f"\n    {name} " in ctl.stdout, name  # listed with its summary
    assert "Exit codes:" in ctl.stdout

    agent = run("luo-agent", "--help")
    assert agent.returncode == 0
    assert "usage: luo-agent" in agent.stdout
    assert "luo-agent.service" in agent.stdout and "liveupdatectl" in agent.stdout
    assert daemon.__doc__ is not None and daemon.__doc__.split(":")[0] not in agent.stdout

    kernel = run("luo-emukernel", "--help")
    assert kernel.returncode == 0
    assert "a stand-in for\n/dev/liveupdate" in kernel.stdout  # wrapped by the program
    for name in ("boot", "poweroff", "status", "inspect"):  # the positional argument's values
        assert f"\n  {name} " in kernel.stdout, name
    assert emukernel.__doc__ is not None and emukernel.__doc__.split(":")[0] not in kernel.stdout


@pytest.mark.parametrize("command", ["prepare", "cancel", "finish", "restore"])
def test_subcommand_help_describes_the_command(command: str) -> None:
    proc = run("liveupdatectl", command, "--help")
    assert proc.returncode == 0
    description = proc.stdout.split("\n\n")[1]
    assert description.strip() and description.strip() != command
    assert "--json" in proc.stdout and "--session-bus" in proc.stdout  # accepted here too
