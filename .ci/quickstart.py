"""Prints one of the two commands of README's '## Quick start' section: `main` or `test`."""
import re
import sys
from pathlib import Path

readme = Path(__file__).resolve().parent.parent / "README.md"
section = re.search(r"^## Quick start\s*$(.*?)(?=^## |\Z)", readme.read_text(), re.S | re.M)
if section is None:
    sys.exit("README.md has no '## Quick start' section")
blocks = re.findall(r"```(?:\w+)?\n(.*?)\n```", section.group(1), re.S)
commands = [block.strip() for block in blocks]
if len(commands) != 2 or any("\n" in command for command in commands):
    sys.exit(f"README's Quick start must hold exactly two one-line commands, found {commands}")
print(commands[{"main": 0, "test": 1}[sys.argv[1]]])
