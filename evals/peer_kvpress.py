"""Peer comparison: NVIDIA kvpress presses on our passkey and multi-turn recall tasks (same model,
prompts, lengths, budgets).

Two steps, two environments:

  run   (default; inside a venv with kvpress==0.5.5, transformers<5.3 and `pip install --no-deps -e .`):
        every case is split into context and question: a passkey prompt before its final question
        (`--task passkey`), or a recall conversation (`--task recall`, evals/recall_cases.py, plain
        format) before its question turn, i.e. the history our sessions had compressed turn by turn
        before the question existed. The press compresses the context at prefill, never seeing the
        question (question-agnostic, like a multi-turn cache); then the question is appended and 8
        (passkey) or 12 (recall) tokens are decoded greedily. A budget B (kept context tokens per
        layer and KV head) maps to compression_ratio = max(0, 1 - B / context_tokens); the kept count
        actually reached is reported.
  merge (main environment, no kvpress needed): kvpress JSON + `lessserve eval passkey --json` (or
        `eval recall --json`) output -> one markdown table, a merged JSON and a PNG.

  python -m lessserve.evals.peer_kvpress --model DIR --out kv.json [--task recall --cases 6]
  python -m lessserve.evals.peer_kvpress merge --kvpress kv.json --ours ours.json --out docs/results/passkey_peers
  python -m lessserve.evals.peer_kvpress model-dir      # prints the converted HF folder of the default model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lessserve.evals.recall_cases import ANSWER_TOKENS

PRESSES = ("StreamingLLMPress", "SnapKVPress", "ObservedAttentionPress")
NO_PRESS = "no_press"
EAGER = {"ObservedAttentionPress"}  # presses that read the attention weights of the forward pass
NEW_TOKENS = 8  # passkey (the recall task decodes recall_cases.ANSWER_TOKENS, as `eval recall`)


def compression_ratio(budget: int, context_tokens: int) -> float:
    """kvpress's compression_ratio (fraction of context pairs removed) for `budget` kept tokens:
    1 - budget / context_tokens, clamped to >= 0. Half a token is added to the kept fraction because
    kvpress keeps int(context_tokens * (1 - ratio)) pairs and float rounding would otherwise keep budget - 1."""
    if context_tokens <= 0:
        raise ValueError("context_tokens must be positive")
    if budget >= context_tokens:
        return 0.0
    return max(0.0, 1.0 - (budget + 0.5) / context_tokens)


def _int_list(value: str) -> list[int]:
    try:
        vals = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return vals


def _pos_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def _press_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in PRESSES and n != NO_PRESS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown {bad or value!r}; choose from {', '.join(PRESSES)}, "
                                         f"{NO_PRESS}")
    return names


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lessserve.evals.peer_kvpress",
                                description="kvpress presses on the lessserve passkey task (run in the kvpress venv)")
    from lessserve.workers.model_loader import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF float folder (or an alias lessserve can resolve in this environment)")
    p.add_argument("--lengths", type=_int_list, default=[512, 1024, 2000])
    p.add_argument("--budgets", type=_int_list, default=[64, 128, 256])
    p.add_argument("--presses", type=_press_list, default=list(PRESSES),
                   help=f"comma-separated: {', '.join(PRESSES)}; a '{NO_PRESS}' (full cache) row is always added")
    p.add_argument("--task", choices=("passkey", "recall"), default="passkey",
                   help="passkey: one prompt, the question split off; recall: the multi-turn conversations of "
                        "`lessserve eval recall --format plain`, the history before the question turn compressed")
    p.add_argument("--trials-per-depth", type=_pos_int, default=2,
                   help="passkey: trials per depth (depths 10/50/90%%)")
    p.add_argument("--cases", type=_pos_int, default=6, help="recall: conversations per length")
    p.add_argument("--part", choices=("train", "dev", "test"), default="test",
                   help="recall: the part of the shared texts the filler turns come from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_pos_int, default=1)
    p.add_argument("--out", default=None, help="JSON output")
    p.add_argument("--no-full", action="store_true", help=f"skip the {NO_PRESS} (full cache) row")
    p.add_argument("--per-press", action="store_true",
                   help="one prefill per press and budget with the press as a context manager (slow; the default "
                        "shares one eager prefill per case between all presses and budgets)")
    return p


def _versions() -> dict:
    from importlib.metadata import version

    return {k: version(k) for k in ("kvpress", "transformers", "torch")}


def _resolve_folder(p: argparse.ArgumentParser, model: str) -> str:
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    try:
        from lessserve.workers.model_loader import resolve_model_folder

        return str(resolve_model_folder(model)[1])
    except Exception as e:  # noqa: BLE001 - any failure means: pass the folder explicitly
        p.error(f"--model: cannot resolve {model!r} here ({type(e).__name__}); pass the HF folder printed by "
                "`python -m lessserve.evals.peer_kvpress model-dir` in the main environment")


def run(argv: list[str]) -> int:
    p = run_parser()
    args = p.parse_args(argv)
    folder = _resolve_folder(p, args.model)
    trials, threads = args.trials_per_depth, args.threads

    import torch

    torch.set_num_threads(threads)
    import kvpress
    import transformers
    from transformers import AutoTokenizer, DynamicCache

    from lessserve.workers.model_loader import transformers_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(folder)
    cases = task_cases(tok, args)
    new_tokens = NEW_TOKENS if args.task == "passkey" else ANSWER_TOKENS
    models: dict[str, object] = {}

    def model_for(attn: str):
        if attn not in models:
            m = transformers_model(folder, attn_implementation=attn)
            models[attn] = m.eval()
        return models[attn]

    def make_press(name: str, budget: int, context_tokens: int):
        return getattr(kvpress, name)(compression_ratio=compression_ratio(budget, context_tokens))

    def decode(model, cache, ids: list[int], cut: int) -> list[int]:
        """Question appended to the (compressed) context cache, then greedy decoding, as in kvpress's
        pipeline: positions continue from the uncompressed context length."""
        pos = torch.arange(cut, len(ids))[None]
        out = model(input_ids=torch.tensor([ids[cut:]]), past_key_values=cache, position_ids=pos, logits_to_keep=1)
        new = [int(out.logits[0, -1].argmax())]
        for i in range(new_tokens - 1):  # no stop on EOS, like our side
            out = model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[len(ids) + i]]))
            new.append(int(out.logits[0, -1].argmax()))
        return new

    def kept_of(cache) -> int:
        return min(cache.get_seq_length(i) for i in range(len(cache.layers)))

    @torch.inference_mode()
    def case_per_press(ids: list[int], cut: int, combos: list[tuple[str, int]]) -> dict:
        """kvpress's own way: the press as a context manager around one prefill per press and budget."""
        res = {}
        for name, budget in combos:
            model, cache, t0 = model_for("eager" if name in EAGER else "sdpa"), DynamicCache(), time.time()
            press = None if name == NO_PRESS else make_press(name, budget, cut)
            with press(model) if press is not None else contextlib.nullcontext():
                model.model(input_ids=torch.tensor([ids[:cut]]), past_key_values=cache)
            kept = kept_of(cache)
            res[(name, budget)] = (decode(model, cache, ids, cut), kept, time.time() - t0)
        return res

    @torch.inference_mode()
    def case_shared(ids: list[int], cut: int, combos: list[tuple[str, int]]) -> dict:
        """One eager prefill of the context; in each attention layer every press/budget compresses the same
        (hidden states, keys, values, attention weights) with its own `compress`. Equivalent to one prefill per
        press: kvpress compresses the cache after the layer's attention, so the prefill never sees compression."""
        from kvpress.utils import extract_keys_and_values

        model = model_for("eager")
        presses = {c: make_press(c[0], c[1], cut) for c in combos if c[0] != NO_PRESS}
        for press in presses.values():
            press.post_init_from_model(model)
        kept_kv: dict[tuple, list] = {c: [] for c in presses}

        def hook(module, _inp, kwargs, output):
            keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
            for c, press in presses.items():
                kept_kv[c].append(press.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs))
            return output

        full, t0 = DynamicCache(), time.time()
        hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
        try:
            model.model(input_ids=torch.tensor([ids[:cut]]), past_key_values=full)
        finally:
            for h in hooks:
                h.remove()
        share, res = (time.time() - t0) / len(combos), {}
        for c in presses:
            t1, cache = time.time(), DynamicCache()
            for layer_idx, (k, v) in enumerate(kept_kv[c]):
                cache.update(k, v, layer_idx)
            kept = kept_of(cache)
            res[c] = (decode(model, cache, ids, cut), kept, share + time.time() - t1)
        full_key = (NO_PRESS, max(args.lengths))
        if full_key in combos:
            t1, kept = time.time(), kept_of(full)
            res[full_key] = (decode(model, full, ids, cut), kept, share + time.time() - t1)
        return res

    combos = ([(NO_PRESS, max(args.lengths))] if not args.no_full else [])
    combos += [(name, b) for name in args.presses if name != NO_PRESS for b in args.budgets]
    one_case = case_per_press if args.per_press else case_shared
    rows = []
    for L in args.lengths:
        got: dict[tuple, list] = {c: [] for c in combos}
        ctx = []
        for j, (ids, cut, check) in enumerate(cases[L]):
            ctx.append(cut)
            t0 = time.time()
            for c, (out, kept, secs) in one_case(ids, cut, combos).items():
                got[c].append((check(out), kept, secs))
            print(f"  length={L:5d} case {j + 1}/{len(cases[L])} ({time.time() - t0:.0f}s)", file=sys.stderr,
                  flush=True)
        n = len(cases[L])
        for i, c in enumerate(combos):
            hits, kept, secs = zip(*got[c], strict=True)
            row = {"system": "kvpress", "policy": c[0], "budget": c[1], "kept_tokens": round(sum(kept) / n, 1),
                   "kept_min": min(kept), "kept_max": max(kept), "context_tokens": round(sum(ctx) / n, 1),
                   "length": L, "accuracy": sum(hits) / n, "trials": n, "seconds": round(sum(secs), 1)}
            rows.append(row)
            print(f"[{i + 1}/{len(combos)}] {c[0]:24s} budget={c[1]:5d} length={L:5d} kept={row['kept_tokens']:7.1f} "
                  f"acc={row['accuracy']:.2f} ({row['seconds']:.0f}s)", file=sys.stderr, flush=True)
    result = {"header": {"versions": _versions(), "threads": threads, "seed": args.seed, "task": args.task,
                         "trials_per_depth": trials, "cases": args.cases, "part": args.part, "new_tokens": new_tokens,
                         "prefill": "per-press" if args.per_press else "shared-eager",
                         "command": "python -m lessserve.evals.peer_kvpress " + " ".join(
                             shlex.quote(a) for a in _portable_argv(argv))},
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


Case = tuple[list[int], int, Callable[[list[int]], bool]]  # (prompt ids, where the question starts, scorer)


def task_cases(tok, args) -> dict[int, list[Case]]:
    """{length: cases} of the task, the same token ids our side runs: passkey prompts split before
    their question, or recall conversations (plain format) split before the question turn."""
    if args.task == "passkey":
        from lessserve.evals.passkey_prompts import answer_ok, passkey_cases, split_question

        return {L: [(ids, split_question(tok, ids), lambda out, k=key: answer_ok(tok, out, k)) for ids, key, _ in cs]
                for L, cs in passkey_cases(tok, args.lengths, args.trials_per_depth, args.seed).items()}
    import copy

    from lessserve.evals.recall_cases import PLAIN_TEMPLATE, answer_ok, question_prompt, recall_cases
    from lessserve.lab.corpus import shared_parts

    plain = copy.copy(tok)
    plain.chat_template = PLAIN_TEMPLATE
    convs = recall_cases(plain, args.lengths, args.cases, args.seed, shared_parts(args.part), "plain")
    return {L: [(*question_prompt(plain, c), lambda out, c=c: answer_ok(tok.decode(out, skip_special_tokens=True), c))
                for c in cs] for L, cs in convs.items()}


def _portable_argv(argv: list[str]) -> list[str]:
    """The command line with machine paths (model folder, output) reduced to their names."""
    out, skip = [], False
    for a in argv:
        if skip:
            out.append(Path(a).name)
            skip = False
            continue
        if a in ("--model", "--out"):
            skip = True
        elif a.startswith(("--model=", "--out=")):
            flag, _, val = a.partition("=")
            a = f"{flag}={Path(val).name}"
        out.append(a)
    return out


# ---------------------------------------------------------------- merge (main environment only)

def _is_full(row: dict) -> bool:
    """Rows of an uncompressed cache: the full cache, no press, and the recall benchmark's floor (the
    full cache without the fact)."""
    return row["policy"] in ("full", NO_PRESS, "floor")


def _label(row: dict) -> tuple[str, str, str]:
    return row["system"], row["policy"], "full" if _is_full(row) else str(row["nominal_budget"])


def merge_rows(kv: dict | list, ours: list[dict]) -> list[dict]:
    """kvpress rows + our rows (system=lessserve) in one list. Each row gets `nominal_budget` (the budget asked
    for) and `kept` (cached context tokens reached). Our equal-memory `+` policies report budget + the LESS state's
    size in tokens (e.g. 68 for 64): their nominal budget is the largest kvpress budget not above it."""
    kv_rows = kv["rows"] if isinstance(kv, dict) else kv
    asked = sorted({r["budget"] for r in kv_rows if not _is_full(r)})
    rows = []
    for r in kv_rows:
        r = dict(r, system=r.get("system", "kvpress"))
        rows.append(dict(r, nominal_budget=r["budget"], kept=r.get("kept_tokens", r["budget"])))
    for r in ours:
        below = [b for b in asked if b <= r["budget"]]
        rows.append(dict(r, system="lessserve", nominal_budget=below[-1] if below else r["budget"], kept=r["budget"]))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one row per system/policy/budget, one column per length (accuracy)."""
    lengths = sorted({r["length"] for r in rows})
    cells: dict[tuple, dict[int, float]] = {}
    kept: dict[tuple, set] = {}
    for r in rows:
        key = _label(r)
        cells.setdefault(key, {})[r["length"]] = r["accuracy"]
        kept.setdefault(key, set()).add(r["kept"])

    def order(k):
        return (k[2] != "full", int(k[2]) if k[2] != "full" else 0, k[0] != "lessserve", k[1])

    def kept_str(key) -> str:
        if key[2] == "full":
            return "all"
        vals = sorted(kept[key])
        return f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}-{vals[-1]:g}"

    lines = ["| system | policy | budget | kept | " + " | ".join(f"L={L}" for L in lengths) + " |",
             "|---|---|---|---|" + "---|" * len(lengths)]
    for key in sorted(cells, key=order):
        accs = " | ".join(f"{cells[key][L]:.2f}" if L in cells[key] else "" for L in lengths)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {kept_str(key)} | {accs} |")
    return "\n".join(lines)


TASK_TITLES = {"passkey": "Passkey accuracy", "recall": "Multi-turn recall accuracy"}


def plot(rows: list[dict], path: Path, task: str = "passkey") -> None:
    """Accuracy vs length, one panel per budget, one line per system:policy (same colour in every panel,
    shifted a few tokens sideways so equal results do not hide each other); the full-cache rows appear in
    every panel as the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({int(_label(r)[2]) for r in rows if _label(r)[2] != "full"}) or [None]
    names = sorted({f"{r['system']}:{r['policy']}" for r in rows})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # a colour per line
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}
    ncol = min(5, len(names), 2 * len(budgets) + 1)  # the legend fits under the panels' width
    legend_h = 0.2 * -(-len(names) // ncol)  # inches: a 0.2-inch row per line of the legend
    height = 3.4 + legend_h
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), height), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], budgets, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if _is_full(r) or r["nominal_budget"] == b:
                series.setdefault(f"{r['system']}:{r['policy']}", []).append((r["length"], r["accuracy"]))
        for name, pts in sorted(series.items()):
            pts.sort()
            ours = name.startswith("lessserve")
            dx = 12 * (names.index(name) - (len(names) - 1) / 2)  # small offset: equal results stay visible
            ax.plot([p[0] + dx for p in pts], [p[1] for p in pts], color=colour[name], marker="o" if ours else "s",
                    linestyle="-" if ours else "--", label=name)
        ax.set_title(f"budget {b} tokens" if b else task)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{task} accuracy")
    handles = [plt.Line2D([], [], color=colour[n], marker="o" if n.startswith("lessserve") else "s",
                          linestyle="-" if n.startswith("lessserve") else "--") for n in names]
    fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_h / height + 0.01, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _commands(header: dict) -> list[str]:
    """A kvpress header's command line(s) (one run's string, or joined runs' list)."""
    c = header.get("command", [])
    return [c] if isinstance(c, str) else list(c)


def merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lessserve.evals.peer_kvpress merge",
                                description="merge kvpress and lessserve passkey or recall JSON: a table, JSON and PNG")
    p.add_argument("--kvpress", required=True, action="append",
                   help="JSON from a kvpress run (or an earlier merged JSON); repeat it to join runs (of other "
                   "lengths, say): a later file's row for the same press, budget and length replaces an earlier one")
    p.add_argument("--ours", required=True,
                   help="JSON from `lessserve eval passkey --json`, `eval report` or `eval recall --json`")
    p.add_argument("--out", required=True, help="output stem: writes STEM.json, STEM.md, STEM.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    def load(flag: str, path: str):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            p.error(f"{flag}: cannot read {path}: {e}")

    kv_by: dict[tuple, dict] = {}
    header: dict = {}
    for path in args.kvpress:
        kv = load("--kvpress", path)
        if isinstance(kv, dict) and "kvpress_header" in kv:  # an earlier merged file: keep its kvpress rows only
            kv = {"header": kv["kvpress_header"], "rows": [r for r in kv["rows"] if r.get("system") == "kvpress"]}
        this = kv.get("header", {}) if isinstance(kv, dict) else {}
        if header and "command" in this:  # a joined run: its command joins the first's
            have = _commands(header)
            header["command"] = have + [c for c in _commands(this) if c not in have]
        header = header or dict(this)
        for r in kv["rows"] if isinstance(kv, dict) else kv:
            kv_by[(r["policy"], r["budget"], r["length"])] = r
    kv = {"header": header, "rows": list(kv_by.values())}
    ours = load("--ours", args.ours)
    if isinstance(ours, dict):  # `lessserve eval report`'s report.json
        ours = ours.get("passkey", [])
    rows = merge_rows(kv, ours)
    task = header.get("task", "passkey")
    md = table(rows)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"kvpress_header": header, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(
        f"# {TASK_TITLES[task]}: lessserve policies vs NVIDIA kvpress presses\n\n"
        f"Versions: {', '.join(f'{k} {v}' for k, v in header.get('versions', {}).items())}. "
        "Budget = kept context tokens per layer and KV head; kvpress compresses the question-free context.\n\n"
        + md + "\n")
    if not args.no_plot:
        plot(rows, stem.with_suffix(".png"), task)
    print(md)
    return 0


def model_dir() -> int:
    from lessserve.workers.model_loader import DEFAULT_MODEL, resolve_model_folder

    print(resolve_model_folder(DEFAULT_MODEL)[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge(argv[1:])
    if argv[:1] == ["model-dir"]:
        return model_dir()
    return run(argv[1:] if argv[:1] == ["run"] else argv)


if __name__ == "__main__":
    sys.exit(main())
