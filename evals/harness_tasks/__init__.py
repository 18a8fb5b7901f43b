"""lm-evaluation-harness tasks over the project's own texts, so `lm_eval.simple_evaluate` downloads
no dataset (`lessserve eval harness`, evals/harness.py).

The YAMLs here name their data as `__DATA_DIR__/<name>.jsonl`; `write_tasks(out_dir, lines)`
writes those jsonl files from the text it is given and copies the YAMLs into `out_dir` with the
placeholder replaced, so `out_dir` is what `TaskManager(include_path=out_dir)` scans. The text
comes from a part (train/dev/test, lab/corpus.py) of `../shared/data` (`part_lines`); none is committed.

    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(write_tasks(tmp_path, part_docs("brown", "test", 12))),
                     include_defaults=False)
    lm_eval.simple_evaluate(model="local-completions", model_args=..., tasks=list(TASKS),
                            task_manager=tm, limit=4)

Run with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 (the json loader needs no network).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lessserve.lab.corpus import DATA_DIR, TEXTS, read_part

HERE = Path(__file__).resolve().parent
TASKS = ("lessserve_rolling", "lessserve_gen", "lessserve_choice")
PLACEHOLDER = "__DATA_DIR__"


@dataclass(frozen=True)
class Doc:
    """A stretch of text: `context` (about `chars` characters of whole lines, long enough to be
    compressed at serving budgets) then `line`, whose last words the choice and generation tasks ask for."""

    context: str
    line: str

    @property
    def text(self) -> str:
        return f"{self.context}\n{self.line}" if self.context else self.line


def part_docs(text: str = "brown", part: str = "test", n: int = 12, chars: int = 2000,
              min_words: int = 8) -> list[Doc]:
    """`n` consecutive docs of `part` of a shared text (lab/corpus.py): each about `chars` characters
    of context, then a line of at least `min_words` words."""
    out, ctx = [], []
    for line in read_part(DATA_DIR / TEXTS[text], part).splitlines():
        line = line.strip()
        if not line:
            continue
        if sum(len(x) + 1 for x in ctx) >= chars and len(line.split()) >= min_words:
            out.append(Doc("\n".join(ctx), line))
            ctx = []
            if len(out) == n:
                break
        else:
            ctx.append(line)
    return out


def _split(line: str) -> tuple[str, str]:
    words = line.split()
    cut = max(1, len(words) - 3)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def write_tasks(out_dir: str | Path, docs: list[Doc]) -> Path:
    """Write rolling/gen/choice jsonl data from `docs` and the YAMLs pointing at it into `out_dir`:
    rolling loglikelihood of each whole doc; choice and generation of its line's ending after its
    context and the line's start."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(docs) < 2:
        raise ValueError("need at least two docs")
    pairs = [_split(d.line) for d in docs]
    pairs = [((d.context + "\n" if d.context else "") + p, t) for d, (p, t) in zip(docs, pairs, strict=True)]
    rows = {
        "rolling": [{"text": d.text} for d in docs],
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
