"""The quality report: perplexity on the test part of every text (lab/corpus.py's split) and passkey
accuracy for every policy and budget, gap-closed figures for +less and the equal-memory + baseline
with 95% paired-bootstrap intervals over windows, written as JSON, a markdown table and plots."""

from __future__ import annotations

import json
from pathlib import Path

from lessserve.evals.passkey import eval_passkey
from lessserve.evals.ppl import eval_ppl
from lessserve.evals.row_cache import RowCache
from lessserve.lab.bootstrap import RESAMPLES, gap_closed_ci
from lessserve.lab.corpus import SPLIT_RULE, read_part
from lessserve.lab.engines import EngineFactory
from lessserve.lab.output import markdown_table, progress
from lessserve.lab.plots import line_plot

POLICIES = ["full", "h2o", "h2o+", "h2o+less", "lambda", "lambda+", "lambda+less"]


def _windows(row: dict) -> tuple[list[float], list[int]]:
    return row["window_nll"], row["window_tokens"]


def gap_closed(rows: list[dict], text: str, resamples: int = RESAMPLES) -> list[dict]:
    """Per base policy and budget: (ppl_base - ppl_x) / (ppl_base - ppl_full) for x = base+less and
    base+ (equal memory), each with a 95% interval (paired bootstrap over windows), and the interval
    of their difference."""
    by = {(r["policy"], r["nominal_budget"]): r for r in rows if r["text"] == text}
    full = next((r for r in rows if r["text"] == text and r["policy"] == "full"), None)
    out = []
    for base in ("h2o", "lambda"):
        for (pol, b), r in sorted(by.items()):
            less = by.get((base + "+less", b))
            if pol != base or less is None or full is None or r["ppl"] <= full["ppl"]:
                continue
            f, base_nll, tok = _windows(full)[0], _windows(r)[0], _windows(r)[1]
            plus = by.get((base + "+", b))
            g = gap_closed_ci(f, base_nll, _windows(less)[0], tok, resamples,
                              versus=_windows(plus)[0] if plus else None)
            row = {"text": text, "policy": base, "budget": b, "windows": g["windows"], "ppl_full": full["ppl"],
                   "ppl_base": r["ppl"], "ppl_less": less["ppl"], "kernels": less.get("kernels", ""),
                   "gap_closed": g["value"], "ci_low": g["low"], "ci_high": g["high"]}
            if plus:
                p = gap_closed_ci(f, base_nll, _windows(plus)[0], tok, resamples)
                row.update(ppl_plus=plus["ppl"], plus_gap_closed=p["value"], plus_ci_low=p["low"],
                           plus_ci_high=p["high"], diff_ci_low=g["diff_low"], diff_ci_high=g["diff_high"],
                           beats_plus=g["low"] > p["value"])
            out.append(row)
    return out


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def gap_table(gaps: list[dict]) -> str:
    rows = [{"text": g["text"], "policy": g["policy"], "budget": g["budget"], "windows": g["windows"],
             "full / base / + / +less ppl": f"{g['ppl_full']:.2f} / {g['ppl_base']:.2f} / "
                                            f"{g.get('ppl_plus', float('nan')):.2f} / {g['ppl_less']:.2f}",
             "+less gap closed [95% CI]": f"**{_pct(g['gap_closed'])}** [{_pct(g['ci_low'])}, {_pct(g['ci_high'])}]",
             "+ gap closed [95% CI]": f"{_pct(g.get('plus_gap_closed'))} [{_pct(g.get('plus_ci_low'))}, "
                                      f"{_pct(g.get('plus_ci_high'))}]",
             "+less - + [95% CI]": f"[{_pct(g.get('diff_ci_low'))}, {_pct(g.get('diff_ci_high'))}]",
             "maps": g["kernels"]} for g in gaps]
    return markdown_table(rows)


def peer_rows(path: str | Path | None) -> list[dict]:
    """kvpress passkey rows of a merged peers file (docs/results/passkey_peers.json), if there is one."""
    if not path or not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    return [r for r in data.get("rows", []) if r.get("system") == "kvpress"]


def run_report(factory: EngineFactory, texts: dict[str, str], policies: list[str], budgets: list[int], context: int,
               windows: int, lengths: list[int], trials: int, out_dir: str | Path, cache: RowCache | None = None,
               part: str = "test", peers: str | Path | None = None, command: str | None = None) -> dict:
    """texts: name -> path; each text's `part` (test) under the split rule is evaluated in at most
    `windows` non-overlapping windows of `context` tokens (fewer where the part is shorter). Writes
    report.json, report.md and PNGs. cache: finished rows of an earlier run, reused when their key
    still matches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppl_rows: list[dict] = []
    for name, path in texts.items():
        progress(f"== perplexity on {name} ({part})")
        for row in eval_ppl(factory, read_part(path, part), policies, budgets, context, windows, cache):
            kb = row.pop("kernels_budget", None)
            row["text"] = name
            here = kb == row["nominal_budget"]
            row["kernels"] = "" if kb is None else ("trained here" if here else f"trained at {kb}")
            ppl_rows.append(row)
    progress("== passkey")
    pk_rows = eval_passkey(factory, policies, budgets, lengths, trials, cache=cache) if lengths else []
    gaps = [g for name in texts for g in gap_closed(ppl_rows, name)]
    command = command or (
        f"lessserve eval report --policies {','.join(policies)} --budgets {','.join(map(str, budgets))} "
        f"--context {context} --windows {windows} --lengths {','.join(map(str, lengths))} --trials {trials}")
    kv = peer_rows(peers)
    report = {"context": context, "windows": windows, "part": part, "split_rule": SPLIT_RULE,
              "bootstrap": f"paired over windows, {RESAMPLES} resamples, percentile 95%",
              "ppl": ppl_rows, "passkey": pk_rows, "gap_closed": gaps, "kvpress_passkey": kv,
              "less_state_tokens": factory.make("h2o+", budgets[0]).less_state_tokens, "command": command}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Quality report (context {context}, up to {windows} windows per text, {part} parts)", "",
          f"Made by `{command}`.", "",
          f"Texts: the `{part}` part of each file ({SPLIT_RULE}); nothing in it was trained on or used to choose "
          "a variant. Windows are non-overlapping and evenly spaced; `+` runs at budget + the LESS state's size in "
          "tokens (equal memory). Intervals: 95%, paired bootstrap over windows "
          f"({RESAMPLES} resamples: every policy is resampled on the same windows).", "",
          "## Gap closed by +less and by the equal-memory + baseline", "",
          "gap closed = (ppl_base - ppl_x) / (ppl_base - ppl_full).", "", gap_table(gaps), ""]
    for name in texts:
        md += [f"## Perplexity: {name}", "", markdown_table(
            [r for r in ppl_rows if r["text"] == name],
            ["policy", "nominal_budget", "budget", "ppl", "tokens", "kernels", "cache_bytes_per_session"]), ""]
        line_plot([r for r in ppl_rows if r["text"] == name], "nominal_budget", "ppl", "policy",
                  out / f"ppl_{name}.png", f"Perplexity vs budget ({name}, {part})", logx=True)
    if pk_rows:
        md += ["## Passkey accuracy", "", markdown_table(pk_rows), ""]
        for r in pk_rows:
            r["series"] = f"{r['policy']}@{r['budget']}"
        line_plot(pk_rows, "length", "accuracy", "series", out / "passkey.png", "Passkey accuracy vs length")
    if kv:
        md += ["## Passkey: NVIDIA kvpress presses (same prompts and budgets; docs/kvpress_peer.md)", "",
               markdown_table(kv, [c for c in ("policy", "budget", "kept_tokens", "length", "accuracy", "trials")
                                   if c in kv[0]]), ""]
    (out / "report.md").write_text("\n".join(md))
    return report
