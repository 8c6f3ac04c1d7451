"""One home of every split (lens_safety.splits), of "output exists", of the default SRR layer and of
jailbreak template filling; each checked against an independent recomputation."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lens_safety.errors import LensSafetyError
from lens_safety.evaluation.jailbreaks import JailbreakTemplate, load_jailbreak_templates
from lens_safety.fsutil import require_free
from lens_safety.prompts import PromptSet
from lens_safety.splits import (
    capped_splits,
    category_split,
    heldout_indices,
    source_fold,
    source_hash,
    source_val_split,
    split_heldout,
    split_indices,
    split_of,
    split_train_val_test,
)
from lens_safety.srr.build import wrap_harmful
from lens_safety.srr.features import default_ranker_layer

TEXTS = [f"instruction number {i}" for i in range(200)]


def _bucket(key: str) -> int:
    return int.from_bytes(bytes.fromhex(hashlib.sha256(key.encode()).hexdigest()[:8]), "big") % 100


def test_library_split_is_the_sha256_bucket_of_the_pair_or_text() -> None:
    for text in TEXTS:
        b = _bucket(text)
        assert split_of(text) == ("train" if b < 60 else "val" if b < 80 else "test")
    pairs = [f"pair-{i // 2}" if i % 3 else None for i in range(len(TEXTS))]
    for which in ("train", "val", "test"):
        want = [i for i, t in enumerate(TEXTS) if split_of(pairs[i] or t) == which]
        assert split_indices(TEXTS, pairs, which) == want
        assert PromptSet(tuple(TEXTS), pairs=tuple(pairs)).split(which).prompts == tuple(
            TEXTS[i] for i in want
        )
    counts = [len(split_indices(TEXTS, None, w)) for w in ("train", "val", "test")]
    assert sum(counts) == len(TEXTS) and 90 < counts[0] < 150
    with pytest.raises(LensSafetyError, match="unknown split"):
        split_indices(TEXTS, None, "dev")


def test_heldout_fraction_ranks_by_seeded_hash_and_ignores_order() -> None:
    texts = TEXTS[:40]
    kept, held = heldout_indices(texts, 0.25, seed=7)
    ranked = sorted(range(40), key=lambda i: hashlib.sha256(f"7|{texts[i]}".encode()).hexdigest())
    assert held == sorted(ranked[:10]) and kept == sorted(ranked[10:])
    shuffled = list(reversed(texts))
    _, held_rev = heldout_indices(shuffled, 0.25, seed=7)
    assert {shuffled[i] for i in held_rev} == {texts[i] for i in held}
    assert heldout_indices(["one"], 0.5) == ([0], [])
    train, val = PromptSet.from_list(texts).train_val_split(0.25, seed=7)
    assert val.prompts == tuple(texts[i] for i in held) and len(train) == 30


def test_two_and_three_way_splits_follow_pairs_or_fall_back_to_the_fraction() -> None:
    paired = PromptSet(tuple(TEXTS), "p", pairs=tuple(f"t{i // 2}" for i in range(len(TEXTS))))
    train, held = split_heldout(paired)
    assert all(split_of(str(p)) == "train" for p in train.pairs or ())
    assert all(split_of(str(p)) != "train" for p in held.pairs or ())
    parts = split_train_val_test(paired)
    assert [p.name for p in parts] == ["p:train", "p:val", "p:test"]
    plain = PromptSet.from_list(TEXTS[:20], "plain")
    train, val, test = split_train_val_test(plain, 0.4)
    assert (len(train), len(val), len(test)) == (12, 4, 4)
    _, small_val, small_test = split_train_val_test(PromptSet.from_list(TEXTS[:5]), 0.4)
    assert small_val is small_test  # fewer than 4 held out: one set serves both


def test_capped_splits_keep_the_first_n_of_each_library_split() -> None:
    harmful = PromptSet.from_list([f"harm {i}" for i in range(60)])
    harmless = PromptSet.from_list([f"help {i}" for i in range(60)])
    out = capped_splits(harmful, harmless, 5, 3, 0)
    assert out["train"][0].prompts == harmful.split("train").prompts[:5]
    assert out["val"][1].prompts == harmless.split("val").prompts[:3]
    assert len(out["test"][0]) == 0
    with pytest.raises(LensSafetyError, match="--n-val must be positive"):
        capped_splits(harmful, harmless, 5, 0, 0)
    with pytest.raises(LensSafetyError, match="split of the prompts is empty"):
        capped_splits(harmful.head(1), harmless.head(1), 5, 3, 3)


def test_source_splits_use_the_salted_64_bit_hash() -> None:
    def h(salt: str, s: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{salt}\x1f{s}".encode()).digest()[:8], "big")

    assert all(source_hash("3", t) == h("3", t) for t in TEXTS[:20])
    train, val = source_val_split(TEXTS, 0.2, seed=3)
    assert val == [i for i, t in enumerate(TEXTS) if h("3", t) / 2**64 < 0.2]
    assert sorted(train + val) == list(range(len(TEXTS)))
    assert [source_fold(t, 5) for t in TEXTS] == [h("cv", t) % 5 for t in TEXTS]
    inside, outside = category_split(["a", "b", None, "a"], ["a"])
    assert (inside, outside) == ([0, 3], [1, 2])
    with pytest.raises(LensSafetyError, match="none of the categories"):
        category_split(["a"], ["z"])


def test_require_free_refuses_an_existing_output_unless_overwrite(tmp_path: Path) -> None:
    require_free(tmp_path / "new", overwrite=False)
    with pytest.raises(LensSafetyError, match="already exists") as info:
        require_free(tmp_path, overwrite=False, option="--save-data")
    assert "--save-data" in str(info.value) and "--overwrite" in str(info.value)
    require_free(tmp_path, overwrite=True)


def test_default_srr_layer_is_a_fifth_of_the_depth_and_at_least_one() -> None:
    assert [default_ranker_layer(n) for n in (1, 2, 5, 24, 30, 32)] == [1, 1, 1, 4, 6, 6]


def test_templates_are_filled_by_plain_substitution_everywhere() -> None:
    """Rule: ``{prompt}`` is replaced and other braces stay (``str.format`` would turn ``{{`` into ``{``)."""
    template = JailbreakTemplate("x", "x", "Say {{literally}} then: {prompt}")
    assert template.wrap("a {b}") == "Say {{literally}} then: a {b}"
    builtin = {t.id: t for t in load_jailbreak_templates("builtin")}
    prompts = PromptSet.from_list(TEXTS[:12])
    for (wrapped, template_id), text in zip(wrap_harmful(prompts, 1.0, seed=0), prompts, strict=True):
        assert template_id is not None and wrapped == builtin[template_id].wrap(text)


def test_stratified_folds_depend_on_the_labels_only_and_keep_proportions() -> None:
    np = pytest.importorskip("numpy")
    from sklearn.model_selection import StratifiedKFold

    from lens_safety.splits import stratified_folds

    labels = np.r_[np.ones(11), np.zeros(14)]
    features = np.random.default_rng(0).normal(size=(25, 3))
    want = list(StratifiedKFold(5, shuffle=True, random_state=0).split(features, labels))
    got = stratified_folds(labels, 5)
    assert len(got) == 5
    for (train, test), (want_train, want_test) in zip(got, want, strict=True):
        assert train.tolist() == want_train.tolist() and test.tolist() == want_test.tolist()
        assert 2 <= int(labels[test].sum()) <= 3  # 11 positives over 5 folds
    assert sorted(int(i) for _, test in got for i in test) == list(range(25))
