"""`lessserve bench gpu`: the one prepared GPU run, every stage in its own process and time limit.

Stages (seconds each, and never past the whole run's budget, default 480):
  probe    GPU name, SMs, memory, driver, torch / triton versions, device-to-device copy bandwidth
  plan     the static roofline (bench/roofline.py) for the probed GPU: the prediction
  aot      ahead-of-time compiles of the decode configurations for sm_80 / sm_90 (CPU-side check)
  tests    the `gpu`-marked tests, natively (kernels vs reference at serving sizes, CUDA graphs)
  kernels  `lessserve bench kernels` (Triton vs torch vs SDPA, 7B / 8B / default shapes)
  decode   decode steps on random weights of 7B / 8B / default shapes: Triton, Triton + CUDA graphs, torch
  serve    multi-turn chat load through the BatchScheduler on random weights (no Ray / tokenizer needed)
  recall   (on request: --stages recall) a turn's TTFT with and without the +recall round after 4k / 16k /
           32k tokens of history on random 8B weights, and the round's page scoring (issue 27's GPU part)
Without a CUDA GPU the GPU stages are skipped, saying so, and the run exits 0 after the CPU-side
ones (a dry run). Output in --out: summary.md and summary.json (naming the GPU), stages.log, and
each stage's JSON - at most 8 files, what the device tool brings back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ON_REQUEST = ("recall",)  # stages --stages can name besides the default run's
GPU_ONLY = ("tests", "kernels", "decode", "serve", *ON_REQUEST)
STAGES = ("probe", "plan", "aot", *(s for s in GPU_ONLY if s not in ON_REQUEST))  # the default run
REPO = Path(__file__).resolve().parents[1]  # the checkout (tests/ lives there)
LIMITS = {"probe": 30, "plan": 20, "aot": 60, "tests": 80, "kernels": 130, "decode": 110, "serve": 60,
          "recall": 300}
BUDGET_S = 480


@dataclass
class Stage:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    rc: int | None = None
    note: str = ""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lessserve.cli.main", *args]


def _plan_gpu(info: dict) -> list[str]:
    """The roofline's GPU: the probed one's datasheet, at its measured copy bandwidth when there is one."""
    name = str(info.get("gpu", "")).lower()
    gpu = next((g for g in ("h200", "h100", "a100") if g in name), "h200")
    return ["--gpu", gpu] + (["--bandwidth", str(info["copy_GB_s"])] if "copy_GB_s" in info else [])


def stage_commands(out: Path, info: dict) -> dict[str, list[str]]:
    """The command of every stage after the probe; stdout goes to stages.log, the JSON to `out`."""
    py = sys.executable
    return {
        "plan": _cli("bench", "kernels", "--plan", *_plan_gpu(info), "--json", str(out / "plan.json")),
        "aot": [py, "-m", "lessserve.kernels.triton.aot", "--space", "decode", "--json", str(out / "aot.json")],
        "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/kernels/test_gpu.py",
                  "tests/workers/test_cuda_graphs.py"],
        "kernels": _cli("bench", "kernels", "--iters", "20", "--warmup", "3", "--batches", "1,8,32,128",
                        "--budgets", "512,2048", "--json", str(out / "kernels.json")),
        "decode": [py, "-m", "lessserve.bench.gpu_run", "decode", str(out / "decode.json")],
        "serve": [py, "-m", "lessserve.bench.gpu_run", "serve", str(out / "serve.json")],
        "recall": [py, "-m", "lessserve.bench.gpu_run", "recall", str(out / "recall.json")],
    }


def probe() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if not torch.cuda.is_available():
        info["gpu"] = "none: NO CUDA GPU on this machine (dry run: CPU-side stages only)"
        return info
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                memory_GiB=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    from lessserve.bench.timer import Timer

    info["copy_GB_s"] = round(Timer("cuda", 3, 10).copy_bandwidth(1 << 30) / 1e9)
    torch.cuda.empty_cache()  # the stages run in child processes
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def _run_stage(name: str, cmd: list[str], limit: float, log, env: dict) -> Stage:
    log.write(f"\n===== {name} (limit {limit:.0f}s): {' '.join(cmd)}\n")
    log.flush()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return Stage(name, "timeout", time.perf_counter() - t0, limit, note=f"killed after {limit:.0f}s")
    dt = time.perf_counter() - t0
    return Stage(name, "ok" if proc.returncode == 0 else "failed", dt, limit, proc.returncode)


def run_gpu(out: Path, stages: list[str], budget_s: float = BUDGET_S) -> int:
    """Run the stages in order; returns 0 unless a stage that ran failed (skips are not failures)."""
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    info = probe()
    gpu = bool(info["cuda_available"])
    print(f"bench gpu: {info['gpu']}", flush=True)
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    cmds, results = stage_commands(out, info), []
    with open(out / "stages.log", "w") as log:
        for name in stages:
            left = budget_s - (time.perf_counter() - t_start)
            if name in GPU_ONLY and not gpu:
                results.append(Stage(name, "skipped", note="no CUDA GPU"))
            elif name == "probe":
                results.append(Stage(name, "ok", note=info["gpu"]))
            elif left < 5:
                results.append(Stage(name, "skipped", note=f"run budget of {budget_s:.0f}s spent"))
            else:
                results.append(_run_stage(name, cmds[name], min(LIMITS[name], left), log, env))
            r = results[-1]
            print(f"bench gpu: {r.name:8s} {r.status:8s} {r.seconds:6.1f}s {r.note}", flush=True)
    summary = {"machine": info, "stages": [asdict(r) for r in results],
               "seconds": time.perf_counter() - t_start, "budget_s": budget_s}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_markdown(summary, out))
    print((out / "summary.md").read_text())
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


def summary_markdown(summary: dict, out: Path) -> str:
    from lessserve.lab.output import markdown_table

    m = summary["machine"]
    lines = [f"# GPU run: {m['gpu']}", "", ", ".join(f"{k} {v}" for k, v in m.items() if k != "gpu"), "",
             markdown_table(summary["stages"], ["name", "status", "seconds", "limit_s", "rc", "note"]), ""]
    for name in ("kernels", "decode", "serve", "recall", "plan"):
        f = out / f"{name}.json"
        if f.is_file():
            rows = json.loads(f.read_text())
            lines += [f"## {name}", "", markdown_table(rows if name != "plan" else rows[:48]), ""]
    f = out / "aot.json"
    if f.is_file():
        from lessserve.kernels.triton.aot import format_table

        lines += ["## aot (compiled here for sm_80 / sm_90)", "", format_table(json.loads(f.read_text())["results"]),
                  ""]
    return "\n".join(lines)


def _stage_main(argv: list[str]) -> int:
    """`python -m lessserve.bench.gpu_run decode|serve|recall FILE`: one stage in this process."""
    what, path = argv
    from lessserve.lab.output import write_json

    if what == "decode":
        from lessserve.bench.random_load import run_random_decode

        res = run_random_decode(["llama2-7b", "llama3-8b", "smollm2-135m"], [1, 8, 32, 64], context=1024, steps=10)
    elif what == "recall":
        from lessserve.bench.random_load import run_random_recall

        res = run_random_recall(["llama3-8b"], [4096, 16384, 32768])
    else:
        from lessserve.bench.random_load import run_random_serve

        res = run_random_serve(["llama3-8b", "smollm2-135m"], users=16, turns=3, new_tokens=64, max_tokens=32)
    res.show()
    write_json(path, res.rows)
    return 0


if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
