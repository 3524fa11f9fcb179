"""Renders the results page and the README's results table from the committed result files.

Every experiment whose figures the documentation quotes keeps its result files under
`results/<experiment>/`: a `results.json` (the figures), a `provenance.json` (the command,
the commit, the machine, the date) and, optionally, a `summary.json` (the rows the page and
the README show). This script reads them all and writes:

- `docs/results.md`: one section per experiment, its tables, its plots
  (`docs/results/<experiment>.png`) and its provenance;
- the table between `<!-- results:begin -->` and `<!-- results:end -->` in `README.md`: the
  rows marked `"headline": true`.

A `summary.json` is `{"title": str, "description": str, "tables": [{"caption": str,
"columns": [str], "rows": [[...]], "headline": [row indices]}], "plots": [{"title": str,
"xlabel": str, "ylabel": str, "series": {name: [[x, y], ...]}, "kind": "line" | "bar"}]}`;
without one, the figures of `results.json` are listed as they are.

Example:

    python scripts/render_results.py            # writes docs/results.md and README's table
    python scripts/render_results.py --check    # fails if either is out of date
"""

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
PAGE = ROOT / "docs" / "results.md"
PLOTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _load(path):
    return json.loads(path.read_text()) if path.exists() else None


def experiments():
    """`[(name, directory)]` of every experiment under `results/`, sorted."""
    if not RESULTS.exists():
        return []
    return sorted(
        (path.parent.relative_to(RESULTS).as_posix(), path.parent)
        for path in RESULTS.rglob("results.json")
    )


def _format(value):
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(caption, columns, rows):
    lines = [f"**{caption}**", "", "| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(_format(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot_path(name, index):
    """Where a summary's plot is drawn: `docs/results/<name>-<index>.png`."""
    return PLOTS / f"{name.replace('/', '-')}-{index}.png"


def _plot(name, index, spec):
    """Draws one plot of a summary to `docs/results/<name>-<index>.png`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6))
    series = spec["series"]
    if spec.get("kind") == "bar":
        labels = list(series)
        values = [series[label] for label in labels]
        axis.barh(range(len(labels)), values, color="tab:blue")
        axis.set_yticks(range(len(labels)), labels)
        axis.invert_yaxis()
        for position, value in enumerate(values):
            axis.text(value, position, f" {value:.3g}", va="center", fontsize=8)
    else:
        for label, points in series.items():
            xs, ys = zip(*points)
            axis.plot(xs, ys, marker="o", label=label)
        axis.legend(fontsize=8)
    axis.set_title(spec["title"])
    axis.set_xlabel(spec.get("xlabel", ""))
    axis.set_ylabel(spec.get("ylabel", ""))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = _plot_path(name, index)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _provenance(provenance):
    if not provenance:
        return "_No provenance recorded._\n"
    machine = provenance.get("machine", {})
    versions = provenance.get("versions", {})
    commit = (provenance.get("commit") or "unknown")[:10]
    if provenance.get("uncommitted_changes"):
        commit += " (with uncommitted changes)"
    return (
        f"Command: `{provenance.get('command')}`  \n"
        f"Commit {commit}, {provenance.get('date')}; {machine.get('cpus')} CPUs "
        f"({machine.get('processor')}), devices {machine.get('devices')}; TensorFlow "
        f"{versions.get('tensorflow')}, Keras {versions.get('keras')}.\n"
    )


def render(plots=True):
    """`(page, headline_rows)`: the results page and the README's rows."""
    sections = [
        "# Results\n",
        "Every figure below comes from a command in the repository, run as written; the "
        "files it wrote are under `results/`, and this page is generated from them "
        "(`python scripts/render_results.py`). Absolute times are of the machine named under "
        "each table; compare ratios measured in the same run.\n",
    ]
    headline = []
    for name, directory in experiments():
        results = _load(directory / "results.json")
        provenance = _load(directory / "provenance.json")
        summary = _load(directory / "summary.json")
        title = summary.get("title", name) if summary else name
        sections.append(f"## {title}\n")
        if summary and summary.get("description"):
            sections.append(summary["description"] + "\n")
        if summary:
            for table in summary.get("tables", []):
                sections.append(_table(table["caption"], table["columns"], table["rows"]))
                for row_index in table.get("headline", []):
                    headline.append((title, table["columns"], table["rows"][row_index], name))
            for index, spec in enumerate(summary.get("plots", [])):
                # The page names every plot; `plots=False` (`--check`) does not draw them.
                path = _plot(name, index, spec) if plots else _plot_path(name, index)
                sections.append(f"![{spec['title']}]({path.relative_to(PAGE.parent)})\n")
        else:
            rows = [(key, value) for key, value in sorted(results.items())]
            sections.append(_table("Figures", ["key", "value"], rows))
        sections.append(_provenance(provenance))
    return "\n".join(sections), headline


def readme_table(headline):
    lines = ["| result | figures | source |", "|---|---|---|"]
    for title, columns, row, name in headline:
        figures = "; ".join(f"{c} {_format(v)}" for c, v in zip(columns, row))
        lines.append(f"| {title} | {figures} | [results](docs/results.md) (`results/{name}`) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Fail if the files are stale.")
    args = parser.parse_args(argv)
    page, headline = render(plots=not args.check)
    readme = README.read_text()
    if BEGIN in readme and END in readme:
        before, rest = readme.split(BEGIN, 1)
        _, after = rest.split(END, 1)
        readme = f"{before}{BEGIN}\n{readme_table(headline)}\n{END}{after}"
    if args.check:
        stale = [p.name for p, text in ((PAGE, page), (README, readme)) if p.read_text() != text]
        if stale:
            print(f"Out of date: {stale}; run `python scripts/render_results.py`.")
            return 1
        return 0
    PAGE.write_text(page)
    README.write_text(readme)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(experiments())} experiments) and README's table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
