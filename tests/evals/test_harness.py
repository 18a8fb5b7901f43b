"""`lessserve eval harness`: lm-evaluation-harness through a real embedded server. Under the full
policy, the harness's rolling loglikelihood of each document is the NLL `lessserve eval ppl` sums
over the same tokens (evals/ppl.window_nll), so the two tools agree on what they measure."""

from __future__ import annotations

import json

import pytest

from lessserve.testing.local_redis import free_port


@pytest.mark.slow
def test_full_policy_scores_equal_eval_ppl_on_the_same_tokens(default_engine, tmp_path):
    from lessserve.cli.main import main
    from lessserve.evals.harness_tasks import part_docs
    from lessserve.evals.ppl import window_nll

    out = tmp_path / "h.json"
    assert main(["eval", "harness", "--policies", "full", "--docs", "3", "--chars", "600", "--limit", "3",
                 "--port", str(free_port()),
                 "--json", str(out), "--plot", str(tmp_path / "h.png")]) == 0
    (row,) = json.loads(out.read_text())
    assert row["policy"] == "full" and row["docs"] == 3 and (tmp_path / "h.png").stat().st_size > 0
    engine = default_engine(policy="full", max_context=1024)
    tok = engine.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id  # the harness's first token
    for doc, ll in zip(part_docs("brown", "test", 3, 600), row["rolling_ll"], strict=True):
        nll, n = window_nll(engine, [prefix, *tok(doc.text, add_special_tokens=False)["input_ids"]])
        assert -ll == pytest.approx(nll, rel=1e-4)
