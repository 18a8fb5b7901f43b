"""Quality per byte: every (policy, kv_bits) at the largest budget whose session slot fits a byte level, on
the test part of every text, with the gap to the full cache closed against today's slot (native h2o at
budget 128) and 95% paired-bootstrap intervals over windows; written as JSON, markdown and a Pareto plot
(bytes per session against gap closed)."""

from __future__ import annotations

import json
from pathlib import Path

from lessserve.evals.ppl import ppl_rows
from lessserve.evals.row_cache import RowCache
from lessserve.lab.bootstrap import RESAMPLES, gap_closed_ci
from lessserve.lab.corpus import SPLIT_RULE, read_part
from lessserve.lab.engines import EngineFactory
from lessserve.lab.equal_bytes import equal_bytes_budget, slot_bytes_at
from lessserve.lab.output import markdown_table, progress
from lessserve.lab.text import read_text, token_windows
from lessserve.workers.compression import Policy

REFERENCE_BUDGET = 128  # today's slot: by default native h2o at this budget is the reference every gap closes from


def level_bytes(factory: EngineFactory, level: int) -> int:
    """Bytes of a native h2o slot at budget `level` in the factory's dtype: the byte levels compared."""
    return slot_bytes_at(factory.make("h2o", level), level, "native", 0)


def plan(factory: EngineFactory, policies: list[str], bits: list[str], level_nbytes: dict[int, int],
         grid: str = "all", reference: int = REFERENCE_BUDGET) -> list[tuple[str, str, int, int]]:
    """(policy, kv_bits, level, budget) runs for the levels of `level_nbytes` (level -> its bytes): every
    policy and bits at every level ("all"), or every policy and bits at the reference level and the h2o
    ones alone at the other levels ("h2o")."""
    runs = []
    for level, nbytes in level_nbytes.items():
        for p in policies:
            if Policy.parse(p).base == "full" or (grid == "h2o" and level != reference
                                                  and Policy.parse(p).base != "h2o"):
                continue
            for b in bits:
                runs.append((p, b, level, equal_bytes_budget(factory.make(p, 128, kv_bits=b), nbytes)))
    return runs


def gap_rows(rows: list[dict], text: str, reference: int = REFERENCE_BUDGET, resamples: int = RESAMPLES) -> list[dict]:
    """Every row of `text` with its gap closed against native h2o at the `reference` level (to the full
    cache), a 95% interval, and the interval of its difference from native h2o at the same bytes. None
    when the reference is no worse than the full cache (no gap to close)."""
    here = [r for r in rows if r["text"] == text]
    full = next(r for r in here if r["policy"] == "full")
    ref = next(r for r in here if r["policy"] == "h2o" and r["kv_bits"] == "native"
               and r["level"] == reference)
    if ref["ppl"] <= full["ppl"]:
        return []
    out = []
    for r in here:
        if r["policy"] == "full":
            continue
        same = next((s for s in here if s["policy"] == "h2o" and s["kv_bits"] == "native"
                     and s["level"] == r["level"]), None)
        g = gap_closed_ci(full["window_nll"], ref["window_nll"], r["window_nll"], r["window_tokens"], resamples,
                          versus=same["window_nll"] if same is not None and same is not r else None)
        out.append({k: r[k] for k in ("text", "policy", "kv_bits", "level", "budget", "cache_bytes_per_session",
                                      "ppl")} |
                   {"ppl_full": full["ppl"], "ppl_ref": ref["ppl"], "gap_closed": g["value"], "ci_low": g["low"],
                    "ci_high": g["high"], "windows": g["windows"],
                    "vs_h2o_native_low": g.get("diff_low"), "vs_h2o_native_high": g.get("diff_high")})
    return out


def frontier(gaps: list[dict]) -> list[dict]:
    """Per (policy, kv_bits, level): the worst text's gap closed and its interval, best first."""
    keys = sorted({(g["policy"], g["kv_bits"], g["level"]) for g in gaps})
    out = []
    for key in keys:
        mine = [g for g in gaps if (g["policy"], g["kv_bits"], g["level"]) == key]
        worst = min(mine, key=lambda g: g["gap_closed"])
        out.append({"policy": key[0], "kv_bits": key[1], "level": key[2], "budget": worst["budget"],
                    "bytes": worst["cache_bytes_per_session"], "texts": len(mine),
                    "worst_text": worst["text"], "worst_gap_closed": worst["gap_closed"],
                    "worst_ci_low": worst["ci_low"], "mean_gap_closed": sum(g["gap_closed"] for g in mine) / len(mine)})
    return sorted(out, key=lambda f: (f["level"], -f["worst_gap_closed"]))


def _pct(x) -> str:
    return "" if x is None or x != x else f"{100 * x:.1f}%"


def pareto_plot(gaps: list[dict], texts: list[str], path: Path, reference: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.4), squeeze=False)
    series = sorted({(g["policy"], g["kv_bits"]) for g in gaps})
    colour = {s: plt.get_cmap("tab20")(i % 20) for i, s in enumerate(series)}
    for ax, text in zip(axes[0], texts, strict=True):
        for pol, bits in series:
            pts = sorted((g["cache_bytes_per_session"] / 1e6, g["gap_closed"], g["ci_low"], g["ci_high"])
                         for g in gaps if g["text"] == text and (g["policy"], g["kv_bits"]) == (pol, bits))
            if not pts:
                continue
            x, y = [p[0] for p in pts], [100 * p[1] for p in pts]
            err = [[100 * (p[1] - p[2]) if p[2] == p[2] else 0 for p in pts],
                   [100 * (p[3] - p[1]) if p[3] == p[3] else 0 for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o" if bits == "native" else ("s" if bits == "8" else "^"),
                        linestyle="-" if "less" in pol else "--", capsize=3, label=f"{pol} {bits}",
                        color=colour[(pol, bits)])
        ax.axhline(100, color="k", linewidth=0.8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per session (MB)")
        ax.set_ylabel(f"gap closed vs native h2o@{reference} (%)")
        ax.set_title(text)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_pareto(factory: EngineFactory, texts: dict[str, str], policies: list[str], bits: list[str],
               levels: list[int], context: int, windows: int, out_dir: str | Path, cache: RowCache | None = None,
               part: str = "test", grid: str = "all", command: str = "", reference: int = REFERENCE_BUDGET,
               extra: dict[str, str] | None = None) -> dict:
    """texts: name -> path, each evaluated on its `part`; extra: name -> path of texts of genres never
    trained on, evaluated whole. Writes pareto.json, pareto.md and pareto.png into `out_dir`."""
    extra = extra or {}
    if reference not in levels:
        raise ValueError(f"the levels must include {reference}, the reference every gap is closed from")
    nbytes = {lv: level_bytes(factory, lv) for lv in levels}
    runs = plan(factory, policies, bits, nbytes, grid, reference)
    out = Path(out_dir)
    rows: list[dict] = []
    for name, path in [*texts.items(), *extra.items()]:
        body = read_text(path) if name in extra else read_part(path, part)
        wins = token_windows(factory.tokenizer, body, context, windows)
        progress(f"== {name} ({'whole file' if name in extra else part}, {len(wins)} windows): full + {len(runs)} runs")
        for row in ppl_rows(factory, wins, [("full", context)], context, cache):
            rows.append(row | {"text": name, "level": None})
        for i, (p, b, level, budget) in enumerate(runs):
            progress(f"[{name} {i + 1}/{len(runs)}] level {level}: {p} kv_bits={b}")
            for row in ppl_rows(factory, wins, [(p, budget)], context, cache, kv_bits=b):
                row.pop("kernels_budget", None)
                rows.append(row | {"text": name, "level": level, "target_bytes": nbytes[level]})
    names = [*texts, *extra]
    gaps = [g for name in names for g in gap_rows(rows, name, reference)]
    front = frontier(gaps)
    report = {"context": context, "windows": windows, "part": part, "split_rule": SPLIT_RULE,
              "reference": f"h2o native at budget {reference}", "levels": levels, "never_trained_on": list(extra),
              "level_bytes": {str(lv): n for lv, n in nbytes.items()},
              "bootstrap": f"paired over windows, {RESAMPLES} resamples, percentile 95%",
              "ppl": rows, "gap_closed": gaps, "frontier": front, "command": command}
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(report, indent=2) + "\n")
    pareto_plot(gaps, names, out / "pareto.png", reference)
    md = [f"# Quality per byte (context {context}, up to {windows} windows per text, {part} parts)", "",
          f"Made by `{command}`.", "",
          f"Each (policy, kv_bits) runs at the largest budget whose session slot fits a byte level: the bytes of "
          f"a native h2o slot at budget `level`. Gap closed = (ppl_ref - ppl) / (ppl_ref - ppl_full), ref = "
          f"native h2o at budget {reference} (today's slot is level 128), so 0% is today and 100% the full cache. "
          f"Texts: the `{part}` part of each file ({SPLIT_RULE})"
          + (f"; never trained on, whole files: {', '.join(extra)}" if extra else "")
          + f". Intervals: 95%, paired bootstrap over windows ({RESAMPLES} resamples). `vs h2o native` is the "
          "interval of the difference from native h2o at the "
          "same bytes (the equal-memory baseline).", "",
          "## Worst text per configuration", "",
          markdown_table([{"level": f["level"], "policy": f["policy"], "kv_bits": f["kv_bits"], "budget": f["budget"],
                           "bytes": f["bytes"], "worst text": f["worst_text"],
                           "worst gap closed": _pct(f["worst_gap_closed"]), "its CI low": _pct(f["worst_ci_low"]),
                           "mean gap closed": _pct(f["mean_gap_closed"])} for f in front]), ""]
    for name in names:
        md += [f"## {name}" + (" (a genre never trained on)" if name in extra else ""), "", markdown_table([
            {"level": g["level"], "policy": g["policy"], "kv_bits": g["kv_bits"], "budget": g["budget"],
             "bytes": g["cache_bytes_per_session"], "ppl": round(g["ppl"], 3),
             "gap closed [95% CI]": f"**{_pct(g['gap_closed'])}** [{_pct(g['ci_low'])}, {_pct(g['ci_high'])}]",
             "vs h2o native [95% CI]": f"[{_pct(g['vs_h2o_native_low'])}, {_pct(g['vs_h2o_native_high'])}]"}
            for g in gaps if g["text"] == name]), "",
            f"full {next(r['ppl'] for r in rows if r['text'] == name and r['policy'] == 'full'):.3f}", ""]
    (out / "pareto.md").write_text("\n".join(md))
    return report
