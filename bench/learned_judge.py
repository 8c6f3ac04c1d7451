"""Learned judge: agreement of `learned` and the three keyword judges with hand labels on the held-out split.

On the held-out test split of the learned judge's hand-labelled pairs (``lens_safety/data/judge/test.jsonl``,
never read by training or selection), all pairs and long answers (at least 100 words): accuracy, precision
and recall with 95% Wilson intervals, and the paired bootstrap interval of the learned judge's accuracy
minus each keyword judge's; once with the prompts passed to the judges, once without. The same numbers as
``lens-safety judge compare`` (and ``--no-prompts``). Run: ``python bench/learned_judge.py``.
"""

from __future__ import annotations

from lens_safety.evaluation.judge_data import TEST_FILE, load_pairs
from lens_safety.evaluation.judge_validation import compare_judges
from lens_safety.evaluation.learned_judge import LearnedJudge

JUDGES = ["substring", "substring-strict", "substring-broad"]


def main() -> None:
    pairs = load_pairs(TEST_FILE)
    learned = LearnedJudge()
    for with_prompts in (True, False):
        result = compare_judges([learned, *JUDGES], pairs, with_prompts=with_prompts, source=TEST_FILE.name)
        print(result.table())
        print()


if __name__ == "__main__":
    main()
