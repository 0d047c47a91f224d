"""Regenerate the README's model table from the registry: `python scripts/gen_model_table.py`.

`--check` exits 1 if README.md is out of date (the tests run it).
"""

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- models:start -->", "<!-- models:end -->"


def render():
    from kseg.cli import model_rows

    lines = ["| model | task | parameters | default input | reference |", "|---|---|---:|---|---|"]
    lines += [f"| `{n}` | {t} | {p} | {i} | {r} |" for n, t, p, i, r in model_rows()]
    return "\n".join(lines)


def updated(text):
    if START not in text or END not in text:
        raise SystemExit(f"{README}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render()}\n{END}{tail}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    new = updated(text)
    if args.check:
        if new != text:
            print("README.md model table is out of date: run python scripts/gen_model_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
