"""The README's worked cell file parses and prints the equations the README shows."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cellsearch import CellSpec

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_custom_cell_matches_its_printed_equations():
    blocks = re.findall(r"```yaml\n(.*?)```", README, re.S)
    cell_block = next(b for b in blocks if "name: my_gated_relu" in b)
    spec = CellSpec.from_dict(yaml.safe_load(cell_block))
    shown = re.search(r"prints it the way the paper writes cells:\n\n```\n(.*?)```", README, re.S).group(1)
    assert spec.equations().strip() == shown.strip()
    assert spec.nodes["z_pre"].bias == 1.0
