"""Mutation score of the core modules with cosmic-ray, against each module's fast tests.

    nice -n 15 python tests/mutation/run.py [MODULE ...] [--minutes N] [--fresh] [--report]

MODULE is a key of MODULES (default: all). Nothing in the checkout is ever mutated: the committed
tree (`git archive HEAD`) is unpacked afresh into a scratch workspace ($LESSSERVE_MUTATION_DIR,
default /tmp/lessserve-mutation) with a `lessserve/` folder of links, so the tests import the
scratch copy, and cosmic-ray mutates that copy, one mutant at a time. Each module's session
database is kept beside the workspace, keyed by the module file's hash: a run stopped by
--minutes (per module) resumes where it stopped; --retest runs the survivors again (after new
tests); --fresh starts over. Results (score, survivors)
go to tests/mutation/results/<module>.json; --report prints the table from those files only.

Operators: one semantic replacement per operator (+ <-> -, * <-> /, // -> /, % -> //, ** -> *,
& <-> |, ^ -> |, << <-> >>; < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in), every
unary operator, `not` added, True <-> False, and <-> or, break <-> continue, numbers +- 1, loops
run zero times, exceptions replaced, decorators removed. Mutants listed in equivalent.toml (same
behaviour as the original) are reported apart and leave the denominator.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = Path(os.environ.get("LESSSERVE_MUTATION_DIR", "/tmp/lessserve-mutation"))
PACKAGES = ("errors", "kernels", "cache_store", "workers", "cluster", "deploy", "lab", "evals", "training", "bench",
            "testing", "cli")

ORACLE_REF = "tests/oracle/test_oracle.py::test_reference_ops_match_the_oracle"
# key: (module file, functions to mutate (None = all), fast tests, most discriminating first)
MODULES: dict[str, tuple[str, list[str] | None, list[str]]] = {
    "attention": ("kernels/reference/attention.py", None,
                  ["tests/workers/test_eviction_reference.py", ORACLE_REF, "tests/kernels/test_attention.py"]),
    "evict": ("kernels/reference/evict.py", None,
              ["tests/workers/test_eviction_reference.py",
               "tests/kernels/test_evict_properties.py::test_reference_eviction_invariants", ORACLE_REF,
               "tests/kernels/test_evict.py"]),
    "lowrank": ("kernels/reference/lowrank.py", None,
                ["tests/kernels/test_lowrank.py", "tests/workers/test_eviction_reference.py", ORACLE_REF,
                 "tests/kernels/test_evict_properties.py::test_reference_eviction_invariants"]),
    "pack": ("kernels/reference/pack.py", None,
             ["tests/kernels/test_pack.py", "tests/cache_store/test_codec.py"]),
    "compression": ("workers/compression.py", None, ["tests/workers/test_compression.py", ORACLE_REF]),
    "codec": ("cache_store/codec.py", None,
              ["tests/cache_store/test_codec.py", "tests/cache_store/test_codec_properties.py"]),
    "turn_plan": ("workers/chat_session.py", ["render", "encode", "plan_turn"], ["tests/workers/test_turn_plan.py"]),
    "auth": ("cluster/auth.py", None, ["tests/cluster/test_auth_isolation.py"]),
    "isolation": ("cluster/router.py", ["check_session"], ["tests/cluster/test_auth_isolation.py"]),
}

_OPS = ["Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_FloorDiv", "Pow_Mul", "BitAnd_BitOr",
        "BitOr_BitAnd", "BitXor_BitOr", "LShift_RShift", "RShift_LShift"]
_CMP = ["Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Eq_NotEq", "NotEq_Eq", "Is_IsNot", "IsNot_Is", "In_NotIn",
        "NotIn_In"]
OPERATORS = re.compile("|".join(
    [f"core/ReplaceBinaryOperator_{o}$" for o in _OPS] + [f"core/ReplaceComparisonOperator_{c}$" for c in _CMP]
    + [r"core/ReplaceUnaryOperator_.*", "core/AddNot$", "core/ReplaceTrueWithFalse$", "core/ReplaceFalseWithTrue$",
       "core/ReplaceAndWithOr$", "core/ReplaceOrWithAnd$", "core/ReplaceBreakWithContinue$",
       "core/ReplaceContinueWithBreak$", "core/NumberReplacer$", "core/ZeroIterationForLoop$",
       "core/ExceptionReplacer$", "core/RemoveDecorator$"]))


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def workspace() -> Path:
    """A pristine copy of the committed tree that imports as `lessserve` (cleans up any killed run)."""
    src = WORK / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (src / "lessserve").mkdir()
    for p in PACKAGES:
        (src / "lessserve" / p).symlink_to(src / p, target_is_directory=True)
    shared = REPO.parent / "shared"
    if shared.is_dir() and not (WORK / "shared").exists():
        (WORK / "shared").symlink_to(shared, target_is_directory=True)
    return src


def test_env(src: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1", "TRITON_INTERPRET": "1",
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # plugin autoload costs ~8 s per run; none is needed


def function_lines(path: Path, names: list[str]) -> list[tuple[int, int]]:
    """Line ranges of the named functions (`Class.method` or `function`)."""
    out, tree = [], ast.parse(path.read_text())

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if name in names and not isinstance(child, ast.ClassDef):
                    out.append((child.lineno, child.end_lineno))
                walk(child, name + ".")

    walk(tree, "")
    assert len(out) == len(names), f"{path}: found {len(out)} of {names}"
    return out


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of every annotation: with `from __future__ import annotations` they are
    never evaluated, so a mutant inside one is equivalent by construction."""
    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations"
               for a in n.names) for n in tree.body):
        return []
    nodes = []
    for n in ast.walk(tree):
        if isinstance(n, ast.arg) and n.annotation is not None:
            nodes.append(n.annotation)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns is not None:
            nodes.append(n.returns)
        elif isinstance(n, ast.AnnAssign):
            nodes.append(n.annotation)
    return [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in nodes]


def skip_out_of_scope(db: Path, path: Path, lines: list[tuple[int, int]] | None) -> None:
    """Mark as skipped every mutant of an operator outside OPERATORS or outside the named functions,
    and (as "annotation", reported as equivalent) every mutant inside an unevaluated annotation."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = annotation_spans(path)
    with use_db(str(db), WorkDB.Mode.open) as wdb:
        for item in list(wdb.pending_work_items):
            m = item.mutations[0]
            row = m.start_pos[0]
            if not OPERATORS.match(m.operator_name) or (lines is not None and not any(a <= row <= b
                                                                                       for a, b in lines)):
                why = "out of scope"
            elif any(a <= tuple(m.start_pos) < b for a, b in spans):
                why = "annotation"
            else:
                continue
            wdb.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output=why))


def forget_survivors(db: Path) -> int:
    """Drop the results of surviving mutants, so that the next exec tests them again (new tests)."""
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(db), WorkDB.Mode.open) as wdb:
        survived = [j for j, r in wdb.results if r.test_outcome is not None and r.test_outcome.name == "SURVIVED"]
    con = __import__("sqlite3").connect(db)
    con.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in survived])
    con.commit()
    con.close()
    return len(survived)


def run_module(key: str, minutes: float, fresh: bool, retest: bool = False) -> None:
    module, functions, tests = MODULES[key]
    src = workspace()
    digest = hashlib.sha256((src / module).read_bytes() + " ".join(tests).encode()).hexdigest()[:12]
    db = WORK / "sessions" / f"{key}-{digest}.sqlite"
    db.parent.mkdir(exist_ok=True)
    if fresh and db.exists():
        db.unlink()
    env = test_env(src)
    sock = str(WORK / "forkserver.sock")
    if os.path.exists(sock):  # a killed server's: the wait below must see the new one's
        os.unlink(sock)
    server = subprocess.Popen([sys.executable, str(HERE / "forkserver.py"), "serve", sock, str(src)], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not os.path.exists(sock):
            if server.poll() is not None:
                raise SystemExit("the fork server did not start")
            time.sleep(0.2)
        if retest and db.exists():
            print(f"[{key}] {forget_survivors(db)} survivors to test again", flush=True)
        run_cosmic_ray(key, module, functions, tests, src, env, sock, db, minutes)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # our own process group
        server.wait()


def run_cosmic_ray(key, module, functions, tests, src, env, sock, db, minutes) -> None:
    client = [sys.executable, "-S", str(HERE / "forkserver.py"), "run", sock]
    pytest_args = ["-x", "-q", "-p", "no:cacheprovider", *tests]
    for _ in range(2):  # once more on a failure: a loaded machine can make a first run fail
        t0 = time.time()
        base = subprocess.run([*client, "900", *pytest_args], cwd=src, env=env, capture_output=True, text=True)
        baseline = time.time() - t0
        if base.returncode == 0:
            break
    else:
        log = WORK / f"{key}-baseline.log"
        if (WORK / "last-run.log").exists():
            shutil.copy(WORK / "last-run.log", log)
        print(f"[{key}] skipped: the unmutated tests fail (exit {base.returncode}); see {log}", flush=True)
        return
    timeout = max(30.0, 4 * baseline + 10)
    command = [*client, f"{timeout:.0f}", *pytest_args]
    cfg = WORK / "sessions" / f"{key}.toml"
    cfg.write_text(
        "[cosmic-ray]\n"
        f"module-path = {json.dumps(module)}\n"
        f"timeout = {timeout + 30:.0f}\n"
        "excluded-modules = []\n"
        f"test-command = {json.dumps(' '.join(command))}\n"
        "[cosmic-ray.distributor]\nname = \"local\"\n")
    if not db.exists():
        sh(["cosmic-ray", "init", str(cfg), str(db)], cwd=src, env=env)
        skip_out_of_scope(db, src / module, function_lines(src / module, functions) if functions else None)
    print(f"[{key}] baseline {baseline:.1f}s; running up to {minutes:g} min", flush=True)
    proc = subprocess.Popen(["cosmic-ray", "exec", str(cfg), str(db)], cwd=src, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=minutes * 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own process group; the next run resumes the database
        proc.wait()
    summarise(key, db, module, baseline)


def equivalents() -> list[dict]:
    path = HERE / "equivalent.toml"
    return tomllib.loads(path.read_text()).get("mutant", []) if path.exists() else []


def summarise(key: str, db: Path, module: str, baseline: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(db), WorkDB.Mode.open) as wdb:
        results = dict(wdb.results)
        rows = []
        for item in wdb.work_items:
            m, r = item.mutations[0], results.get(item.job_id)
            rows.append((m.operator_name, m.occurrence, m.start_pos[0], m.start_pos[1],
                         r.worker_outcome.name if r else None, r.test_outcome.name if r and r.test_outcome else None,
                         r.diff if r else None, r.output if r else None))
    eq = {(e["module"], e["line"], e["operator"]): e["reason"] for e in equivalents()}
    killed = survived = pending = incompetent = 0
    survivors, equivalent = [], []
    annotations = 0
    for op, occ, line, col, worker, test, diff, output in rows:
        if worker == "SKIPPED":
            annotations += output == "annotation"
            continue
        if worker is None:
            pending += 1
        elif test == "SURVIVED":
            if (key, line, op) in eq:
                equivalent.append({"line": line, "operator": op, "reason": eq[(key, line, op)]})
            else:
                survived += 1
                survivors.append({"line": line, "col": col, "operator": op, "occurrence": occ,
                                  "diff": "\n".join(x for x in (diff or "").splitlines() if x[:1] in "+-"
                                                    and not x.startswith(("+++", "---")))})
        elif test == "INCOMPETENT":
            incompetent += 1
        else:
            killed += 1  # killed by a failing test, or by the timeout
    done = killed + incompetent + survived
    res = {"module": module, "killed": killed + incompetent, "survived": survived,
           "equivalent": len(equivalent), "annotations": annotations, "pending": pending,
           "score": round((killed + incompetent) / done, 4) if done else None,
           "baseline_s": round(baseline, 1), "tests": MODULES[key][2],
           "survivors": survivors, "equivalent_mutants": equivalent}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{key}.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def report() -> None:
    print("| module | file | killed | survived | equivalent (listed + annotations) | pending | score |")
    print("|---|---|---|---|---|---|---|")
    tk = ts = 0
    for key in MODULES:
        f = RESULTS / f"{key}.json"
        if not f.exists():
            print(f"| {key} | {MODULES[key][0]} | - | - | - | not run | - |")
            continue
        r = json.loads(f.read_text())
        tk, ts = tk + r["killed"], ts + r["survived"]
        score = f"{r['score']:.1%}" if r["score"] is not None else "-"
        print(f"| {key} | {r['module']} | {r['killed']} | {r['survived']} | {r['equivalent']} + "
              f"{r['annotations']} | {r['pending']} | {score} |")
    if tk + ts:
        print(f"| all | | {tk} | {ts} | | | {tk / (tk + ts):.1%} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--minutes", type=float, default=10.0, help="time bound per module (resumable)")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results of these modules")
    ap.add_argument("--retest", action="store_true", help="test the surviving mutants again (after new tests)")
    ap.add_argument("--report", action="store_true", help="only print the table of the saved results")
    a = ap.parse_args(argv)
    unknown = set(a.modules) - set(MODULES)
    if unknown:
        ap.error(f"unknown modules {sorted(unknown)}; choose from {', '.join(MODULES)}")
    if not a.report:
        for key in a.modules or list(MODULES):
            run_module(key, a.minutes, a.fresh, a.retest)
    report()


if __name__ == "__main__":
    main()
