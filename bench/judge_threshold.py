"""Choose a judge detector's threshold on an audit of the calib split, never on the prompts a report is
about: the threshold that maximises balanced agreement with the keyword detector's verdicts on the
distinct (prompt, answer) pairs of that audit. Nothing is generated: both detectors judge the stored
answers.

    kvedge audit --limit 20 --split calib --out runs/calib
    python bench/judge_threshold.py runs/calib --judge judge:default

prints the chosen threshold, its balanced agreement on calib, the judge's rank agreement with the
keyword verdicts (AUC: the chance that a keyword refusal scores above a keyword answer), and the spec
to audit or re-judge the eval split with (`judge:...@THRESHOLD`).
"""

from __future__ import annotations

import argparse

import numpy as np

from kvedge.detectors import close_detector, make_detector
from kvedge.detectors.judge import choose_threshold
from kvedge.audit.rejudge import load_audit
from kvedge.stats import wilson
from kvedge.audit.summary import summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("calib_audit", help="an audit directory of the calib split")
    ap.add_argument("--judge", default="judge:default", help="judge spec, without a threshold")
    args = ap.parse_args()

    outcome, rows = load_audit(args.calib_audit)
    splits = {p.split for p in outcome.spec.prompts}
    if splits != {"calib"}:
        raise SystemExit(f"{args.calib_audit} holds the {', '.join(sorted(splits))} split: choose on calib only")
    judge = make_detector(args.judge)
    try:
        keyword = summarize(outcome, rows, make_detector("keyword")).attempts
        judged = summarize(outcome, rows, judge).attempts
    finally:
        close_detector(judge)
    pairs: dict[tuple[str, str], tuple[float, bool]] = {}
    for k, j in zip(keyword, judged):
        if j["score"] is not None:  # empty answers are refusals for both, by rule
            pairs[(k["prompt"], k["response"])] = (j["score"], k["refused"])
    scores = np.array([s for s, _ in pairs.values()])
    ref = np.array([r for _, r in pairs.values()])
    t, balanced = choose_threshold(list(scores), list(ref))
    auc = float(np.mean([(a > b) + 0.5 * (a == b) for a in scores[ref] for b in scores[~ref]]))
    agree = int(((scores >= t) == ref).sum())
    print(f"calib audit {args.calib_audit}: {len(keyword)} attempts, {len(pairs)} distinct answers "
          f"({int(ref.sum())} keyword refusals, {int((~ref).sum())} answers)")
    print(f"judge {judge.id.rsplit('-t', 1)[0]}: AUC vs keyword {auc:.3f}")
    r = wilson(agree, len(pairs))
    print(f"threshold {t:g}: balanced agreement {balanced:.3f}; agreement {agree}/{len(pairs)} "
          f"= {r.rate:.3f} [{r.lo:.3f}, {r.hi:.3f}]")
    print(f"use: --detector {args.judge}@{t:g}")


if __name__ == "__main__":
    main()
