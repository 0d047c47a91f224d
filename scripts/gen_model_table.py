"""Regenerate the README's model table and kseg/models/catalog.json from the registry:
`python scripts/gen_model_table.py`.

The catalogue is what `kseg models` lists without importing Keras (see kseg.cli.CATALOG).
`--check` exits 1 if README.md or the catalogue is out of date (the tests run it).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CATALOG = ROOT / "kseg" / "models" / "catalog.json"
START, END = "<!-- models:start -->", "<!-- models:end -->"


def render():
    from kseg.cli import model_rows

    lines = ["| model | task | parameters | default input | reference |", "|---|---|---:|---|---|"]
    lines += [f"| `{n}` | {t} | {p} | {i} | {r} |" for n, t, p, i, r in model_rows()]
    return "\n".join(lines)


def render_catalog():
    """catalog.json's text: the registry's tasks and models, one model per line for readable diffs."""
    from kseg.cli import catalog_entries

    entries = catalog_entries()
    models = ",\n".join("  " + json.dumps(m, ensure_ascii=False) for m in entries["models"])
    return f'{{"tasks": {json.dumps(entries["tasks"])},\n "models": [\n{models}\n]}}\n'


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
    catalog = render_catalog()
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, want in ((README, new), (CATALOG, catalog))
                 if not p.exists() or p.read_text(encoding="utf-8") != want]
        if stale:
            print(f"{' and '.join(stale)} out of date: run python scripts/gen_model_table.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    CATALOG.write_text(catalog, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
