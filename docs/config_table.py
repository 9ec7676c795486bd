"""The README's DASH settings table, generated from the one source of the settings' text.

`vllm_dash.config` holds every DASH key's default, allowed values and meaning (the same text
that error messages and `vllm-dash config` print); this renders it as the Markdown table
between the README's `BEGIN dash-config-table` / `END dash-config-table` markers, so the
README cannot drift from the code. tests/cpu/test_docs.py checks that it has not.

    python docs/config_table.py           # print the table
    python docs/config_table.py --write   # replace the table in README.md
    python docs/config_table.py --check   # exit status 1 if README.md's table differs
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- BEGIN dash-config-table[^\n]*-->\n)(.*?)(<!-- END dash-config-table -->)",
                    re.S)


def rows() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) for every DASH key, in DashConfig's field order."""
    from vllm_dash import config

    defaults = config.DashConfig()
    out = []
    for key in config.DashConfig.keys():
        allowed, meaning = config._DOC[key]
        value = getattr(defaults, key)
        out.append((key, json.dumps(list(value) if isinstance(value, tuple) else value),
                    allowed, meaning))
    return out


def render() -> str:
    """The Markdown table (ends with a newline)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, default, allowed, meaning in rows():
        cells = (f"`{key}`", f"`{default}`", allowed, meaning)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def readme_table(text: str) -> str:
    """The table currently between the README's markers."""
    m = _BLOCK.search(text)
    if m is None:
        raise ValueError("README.md has no dash-config-table markers")
    return m.group(2)


def main(argv: list[str]) -> int:
    table = render()
    if not argv:
        print(table, end="")
        return 0
    text = README.read_text()
    if argv == ["--check"]:
        if readme_table(text) == table:
            return 0
        print("README.md's DASH settings table is out of date: run "
              "`python docs/config_table.py --write`", file=sys.stderr)
        return 1
    if argv == ["--write"]:
        readme_table(text)                                  # the markers must exist
        README.write_text(_BLOCK.sub(lambda m: m.group(1) + table + m.group(3), text))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
