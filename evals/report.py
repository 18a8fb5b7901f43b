"""The quality report: perplexity on several texts and passkey accuracy for every policy and
budget, gap-closed figures for +less, written as JSON, a markdown table and plots."""

from __future__ import annotations

import json
from pathlib import Path

from lessserve.evals.passkey import eval_passkey
from lessserve.evals.ppl import eval_ppl, read_text
from lessserve.evals.row_cache import RowCache
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import markdown_table, progress
from lessserve.lab.plots import line_plot

POLICIES = ["full", "h2o", "h2o+", "h2o+less", "lambda", "lambda+", "lambda+less"]


def gap_closed(rows: list[dict], text: str) -> list[dict]:
    """(ppl_base - ppl_base+less) / (ppl_base - ppl_full) per budget, for h2o and lambda."""
    by = {(r["policy"], r["nominal_budget"]): r["ppl"] for r in rows if r["text"] == text}
    full = next((r["ppl"] for r in rows if r["text"] == text and r["policy"] == "full"), None)
    out = []
    for base in ("h2o", "lambda"):
        for (pol, b), ppl in sorted(by.items()):
            if pol != base or (base + "+less", b) not in by or full is None or ppl == full:
                continue
            out.append({"text": text, "policy": base, "budget": b,
                        "gap_closed": (ppl - by[(base + "+less", b)]) / (ppl - full),
                        "plus_gap_closed": (ppl - by[(base + "+", b)]) / (ppl - full)
                        if (base + "+", b) in by else None})
    return out


def run_report(factory: EngineFactory, texts: dict[str, tuple[str, float | None]], policies: list[str],
               budgets: list[int], context: int, windows: int, lengths: list[int], trials: int,
               out_dir: str | Path, cache: RowCache | None = None) -> dict:
    """texts: name -> (path, tail fraction or None). Writes report.json, report.md and PNGs.
    cache: finished rows from an earlier (interrupted) run, reused when their key still matches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppl_rows: list[dict] = []
    for name, (path, tail) in texts.items():
        progress(f"== perplexity on {name}")
        for row in eval_ppl(factory, read_text(path, tail_fraction=tail), policies, budgets, context, windows,
                            cache):
            kb = row.pop("kernels_budget", None)
            row["text"] = name
            here = kb == row["nominal_budget"]
            row["kernels"] = "" if kb is None else ("trained here" if here else f"trained at {kb}")
            ppl_rows.append(row)
    progress("== passkey")
    pk_rows = eval_passkey(factory, policies, budgets, lengths, trials, cache=cache)
    gaps = [g for name in texts for g in gap_closed(ppl_rows, name)]
    command = (f"lessserve eval report --policies {','.join(policies)} --budgets {','.join(map(str, budgets))} "
               f"--context {context} --windows {windows} --lengths {','.join(map(str, lengths))} --trials {trials}")
    report = {"context": context, "windows": windows, "ppl": ppl_rows, "passkey": pk_rows, "gap_closed": gaps,
              "less_state_tokens": factory.make("h2o+", budgets[0]).less_state_tokens, "command": command}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Quality report (context {context}, {windows} windows)", "", f"Made by `{command}`.", ""]
    for name in texts:
        md += [f"## Perplexity: {name}", "", markdown_table(
            [r for r in ppl_rows if r["text"] == name],
            ["policy", "nominal_budget", "budget", "ppl", "kernels", "cache_bytes_per_session"]), ""]
        line_plot([r for r in ppl_rows if r["text"] == name], "nominal_budget", "ppl", "policy",
                  out / f"ppl_{name}.png", f"Perplexity vs budget ({name})", logx=True)
    md += ["## Gap closed by +less (and by the equal-memory + baseline)", "", markdown_table(gaps), "",
           "## Passkey accuracy", "", markdown_table(pk_rows), ""]
    for r in pk_rows:
        r["series"] = f"{r['policy']}@{r['budget']}"
    line_plot(pk_rows, "length", "accuracy", "series", out / "passkey.png", "Passkey accuracy vs length")
    (out / "report.md").write_text("\n".join(md))
    return report
