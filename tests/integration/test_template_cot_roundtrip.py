"""Round trip on the real data: for every Twitter-GMNER v2.0 train tweet and every template route, parsing the chain's
assistant turn gives exactly the gold triples. Needs ../shared (beside the repo root); skipped when it is absent.
``GMNER_SHARED_DIR`` points elsewhere (e.g. from a git worktree whose parent has no shared/)."""

from __future__ import annotations


import pytest

from conftest import GMNER_V2
from gmner_pipeline.answer import gold_triples, parse_answer, same_triples
from gmner_pipeline.ingest.twitter_gmner import read_twitter_gmner
from gmner_pipeline.stage import StageContext
from gmner_pipeline.stages.template_cot import ROUTES, TemplateCoTConfig, TemplateCoTStage

DATA = GMNER_V2

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(not (DATA / "txt" / "train.txt").is_file(), reason=f"{DATA} not found (../shared absent)"),
]


def test_every_train_chain_round_trips():
    records = list(read_twitter_gmner(DATA, "train"))
    assert len(records) == 7000 and all(r["status"] == "ok" for r in records)
    TemplateCoTStage(TemplateCoTConfig(routes=list(ROUTES)), StageContext(seed=0))(records)

    failures = []
    for rec in records:
        chains = rec["cot"]["chains"]
        assert sorted(c["route"] for c in chains) == sorted(ROUTES)
        for chain in chains:
            # check independently of the stage's own check
            parsed = parse_answer(chain["answer"])
            ok = parsed.ok and same_triples(parsed.triples, gold_triples(rec))
            assert ok == chain["consistent"], (rec["id"], chain["rejection"])
            if not ok:
                failures.append((rec["id"], chain["route"], chain["answer"]))

    assert not failures, f"{len(failures)} chains do not round-trip, e.g. {failures[:3]}"
