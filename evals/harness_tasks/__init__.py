"""lm-evaluation-harness tasks over the project's own texts, so `lm_eval.simple_evaluate` downloads
no dataset (`lessserve eval harness`, evals/harness.py).

The YAMLs here name their data as `__DATA_DIR__/<name>.jsonl`; `write_tasks(out_dir, lines)`
writes those jsonl files from the text it is given and copies the YAMLs into `out_dir` with the
placeholder replaced, so `out_dir` is what `TaskManager(include_path=out_dir)` scans. The text
comes from a part (train/dev/test, lab/corpus.py) of `../shared/data` (`part_lines`); none is committed.

    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(write_tasks(tmp_path, part_lines("brown", "test", 12))),
                     include_defaults=False)
    lm_eval.simple_evaluate(model="local-completions", model_args=..., tasks=list(TASKS),
                            task_manager=tm, limit=4)

Run with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (the json loader needs no network).
"""

from __future__ import annotations

import json
from pathlib import Path

from lessserve.lab.corpus import DATA_DIR, TEXTS, read_part

HERE = Path(__file__).resolve().parent
TASKS = ("lessserve_rolling", "lessserve_gen", "lessserve_choice")
PLACEHOLDER = "__DATA_DIR__"


def part_lines(text: str = "brown", part: str = "test", n: int = 12, min_words: int = 8) -> list[str]:
    """The first `n` lines of at least `min_words` words of `part` of a shared text (lab/corpus.py)."""
    out = []
    for line in read_part(DATA_DIR / TEXTS[text], part).splitlines():
        line = line.strip()
        if len(line.split()) >= min_words:
            out.append(line)
            if len(out) == n:
                break
    return out


def _split(line: str) -> tuple[str, str]:
    words = line.split()
    cut = max(1, len(words) - 3)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def write_tasks(out_dir: str | Path, lines: list[str]) -> Path:
    """Write rolling/gen/choice jsonl data from `lines` and the YAMLs pointing at it into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(lines) < 2:
        raise ValueError("need at least two lines of text")
    pairs = [_split(line) for line in lines]
    rows = {
        "rolling": [{"text": line} for line in lines],
        "gen": [{"prompt": p, "target": t} for p, t in pairs],
        # choice 0 is the line's own ending, choice 1 the next line's; label 0 is right
        "choice": [
            {"prompt": p, "choices": [t, pairs[(i + 1) % len(pairs)][1]], "label": 0} for i, (p, t) in enumerate(pairs)
        ],
    }
    for name, docs in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    for yaml_file in sorted(HERE.glob("*.yaml")):
        text = yaml_file.read_text(encoding="utf-8").replace(PLACEHOLDER, str(out.resolve()))
        (out / yaml_file.name).write_text(text, encoding="utf-8")
    return out
