"""`lessserve eval harness`: lm-evaluation-harness, the harness people already use, scoring the
served model through this server's /v1/completions, once per compression policy. Each policy is
served by a real embedded cluster (local Ray, the default in-process tiers) on 127.0.0.1; the
harness's own `local-completions` model talks to it over HTTP; the tasks are defined over a part
of the project's texts (evals/harness_tasks), so no data set is downloaded.

Per policy: rolling loglikelihood (word perplexity, bits per byte, and the NLL per token, which for
`full` equals `lessserve eval ppl`'s on the same tokens), a two-way choice (accuracy) and greedy
generation (exact match)."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

from lessserve.evals.harness_tasks import TASKS, part_docs, write_tasks
from lessserve.lab.output import progress
from lessserve.lab.served import ServeProcess


def evaluate(url: str, model_name: str, tokenizer_folder: Path, task_dir: Path, limit: int | None) -> dict:
    """lm_eval.simple_evaluate through the server: its results and per-document samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer is a local folder; nothing is fetched
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="local-completions", tasks=list(TASKS), task_manager=tm, limit=limit, log_samples=True,
        model_args=f"base_url={url}/v1/completions,model={model_name},tokenizer_backend=huggingface,"
                   f"tokenizer={tokenizer_folder},tokenized_requests=True,num_concurrent=1,max_retries=1")


def rolling_lls(out: dict) -> list[float]:
    """The harness's loglikelihood of each rolling document, in order."""
    lls = []
    for s in sorted(out["samples"]["lessserve_rolling"], key=lambda s: s["doc_id"]):
        v = s["resps"][0][0]
        lls.append(float(v[0] if isinstance(v, (list, tuple)) else v))
    return lls


def score_row(policy: str, budget: int, out: dict, tokens: list[int]) -> dict:
    res = out["results"]
    lls = rolling_lls(out)
    nll_per_token = -sum(lls) / sum(tokens[: len(lls)])
    return {"policy": policy, "budget": budget, "docs": len(lls),
            "nll_per_token": nll_per_token, "token_ppl": math.exp(nll_per_token),
            "word_perplexity": res["lessserve_rolling"]["word_perplexity,none"],
            "bits_per_byte": res["lessserve_rolling"]["bits_per_byte,none"],
            "choice_acc": res["lessserve_choice"]["acc,none"],
            "gen_exact_match": res["lessserve_gen"]["exact_match,none"],
            "rolling_ll": lls}


def run_harness(policies: list[str], budget: int, text: str, part: str, docs: int, chars: int, limit: int | None,
                port: int) -> list[dict]:
    from lessserve.cluster.config import load_config
    from lessserve.workers.model_loader import load_checkpoint, load_tokenizer

    cfg = load_config()
    folder = load_checkpoint(cfg.engine.model).folder
    tok = load_tokenizer(folder)
    items = part_docs(text, part, docs, chars)
    tokens = [len(tok(d.text, add_special_tokens=False)["input_ids"]) for d in items]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = write_tasks(Path(tmp) / "tasks", items)
        for i, policy in enumerate(policies):
            progress(f"[{i + 1}/{len(policies)}] {policy}: starting the server ...")
            t0 = time.time()
            server = ServeProcess(port, ["--host", "127.0.0.1", "--port", str(port), "--policy", policy,
                                         "--budget", str(budget)], Path(tmp) / f"serve-{i}.log")
            try:
                server.wait_ready()
                out = evaluate(server.url, cfg.model_name, folder, task_dir, limit)
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):  # killed past its budget: go on
                    server.stop()
            row = score_row(policy, budget, out, tokens)
            rows.append(row)
            progress(f"[{i + 1}/{len(policies)}] {policy}: token ppl {row['token_ppl']:.3f}, bits/byte "
                     f"{row['bits_per_byte']:.4f}, choice acc {row['choice_acc']:.2f} ({time.time() - t0:.0f} s)")
    return rows


def bar_plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([r["policy"] for r in rows], [r["bits_per_byte"] for r in rows])
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("lm-evaluation-harness through the server, per policy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
