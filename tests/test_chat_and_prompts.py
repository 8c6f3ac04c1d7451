"""Chat formatting (one BOS, post-instruction positions, left padding) and prompt sets."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from lens_safety.chat import ChatFormatter
from lens_safety.errors import LensSafetyError
from lens_safety.prompts import PromptSet, check_disjoint, split_of


def test_post_instruction_tokens_of_smollm2(smollm2):
    tokens = smollm2.chat.post_instruction_tokens()
    assert "".join(tokens) == smollm2.chat.template_tail()
    assert smollm2.chat.post_instruction_positions() == tuple(range(-len(tokens), 0))


def test_left_padding_and_mask(smollm2):
    batch = smollm2.chat.encode(["hi", "a much longer instruction with many more words in it"])
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[0, -1] == 1
    assert batch.attention_mask[1].all()
    assert batch.position_ids[0, -1] == batch.attention_mask[0].sum() - 1


def test_exactly_one_bos_when_template_writes_it_and_tokenizer_adds_it(smollm2_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    # a Llama-3-like setup: the template writes BOS text and the tokenizer would add another
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    tok.add_bos_token = True
    fmt = ChatFormatter(tok)
    ids = fmt.token_ids(fmt.format("hello"))
    if fmt._adds_bos():
        assert ids[0] == bos and ids[1] != bos
    assert ids.count(bos) == 1


def test_missing_chat_template_is_a_clear_error_with_fallback(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    tok.chat_template = None
    with pytest.raises(LensSafetyError, match=r"no chat template.*chat_template=False"):
        ChatFormatter(tok)
    plain = ChatFormatter(tok, use_chat_template=False)
    assert plain.format("hello").endswith("User: hello\nAssistant:")
    assert plain.n_post_instruction() >= 1


def test_system_prompt_is_inserted(smollm2):
    text = smollm2.chat.format("hello", system_prompt="Refuse unsafe requests.")
    assert "Refuse unsafe requests." in text and text.count("hello") == 1


def test_prompt_loaders(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\nfirst\n\nsecond\n")
    assert PromptSet.load(tmp_path / "p.txt").prompts == ("first", "second")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t, "category": "c"}) for t in ["a", "b"]))
    loaded = PromptSet.load(tmp_path / "p.jsonl", column="text")
    assert loaded.prompts == ("a", "b") and loaded.categories == ("c", "c")
    (tmp_path / "p.csv").write_text("goal,x\nalpha,1\nbeta,2\n")
    assert PromptSet.load(tmp_path / "p.csv", column="goal").prompts == ("alpha", "beta")
    with pytest.raises(LensSafetyError, match="no column 'prompt'"):
        PromptSet.load(tmp_path / "p.csv")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LensSafetyError, match="empty"):
        PromptSet.load(tmp_path / "empty.txt")
    with pytest.raises(LensSafetyError, match="does not exist"):
        PromptSet.load(tmp_path / "missing.txt")


def test_builtin_splits_are_deterministic_disjoint_and_pair_aligned():
    harmful, harmless = PromptSet.load("builtin:harmful"), PromptSet.load("builtin:harmless")
    assert len(harmful) >= 300 and len(harmless) >= 300
    check_disjoint(harmful, harmless)
    parts = [harmful.split(s) for s in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(harmful)
    assert not set(parts[0].prompts) & set(parts[2].prompts)
    assert PromptSet.load("builtin:harmful:test") == parts[2]
    # a topic pair lands in the same split on both sides
    pair_split = {p: split_of(p) for p in harmful.pairs if p}
    for prompt_pair in harmless.split("test").pairs or ():
        if prompt_pair:
            assert pair_split[prompt_pair] == "test"


def test_training_only_benign_set_shares_no_prompt_with_any_split():
    extra = PromptSet.load("builtin:harmless_extra")
    assert len(extra) >= 200 and len(set(extra.prompts)) == len(extra)
    assert set(extra.categories or ()) >= {"weapons", "drugs", "hacking", "self_harm", "xstest_style"}
    for kind in ("harmful", "harmless"):
        check_disjoint(extra, PromptSet.load(f"builtin:{kind}"))
    with pytest.raises(LensSafetyError, match="has no splits"):
        PromptSet.load("builtin:harmless_extra:val")


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def test_holdout_sets_are_new_instructions_not_paraphrases_of_any_other_set():
    """The held-out SRR test sets: whole (no splits), balanced, and no prompt shares more than
    60% of its words (Jaccard) with any prompt of the training-side sets."""
    harmful, harmless = PromptSet.load("builtin:harmful_holdout"), PromptSet.load("builtin:harmless_holdout")
    assert len(harmful) == len(harmless) == 128
    counts = Counter(harmful.categories or ())
    assert len(counts) == 8 and set(counts.values()) == {16}
    check_disjoint(harmful, harmless)
    others = [
        p for name in ("harmful", "harmless", "harmless_extra") for p in PromptSet.load(f"builtin:{name}")
    ]
    other_words = [_words(p) for p in others]
    for prompt in (*harmful, *harmless):
        words = _words(prompt)
        closest = max(len(words & o) / len(words | o) for o in other_words)
        assert closest < 0.6, prompt
    for name in ("harmful_holdout", "harmless_holdout"):
        with pytest.raises(LensSafetyError, match="has no splits"):
            PromptSet.load(f"builtin:{name}:test")


@pytest.mark.parametrize("suffix", ["2", "3"])
def test_later_holdout_pairs_are_new_instructions(suffix: str) -> None:
    """``builtin:*_holdout_2`` and ``_3``: whole, balanced by category, disjoint from each other,
    and no prompt shares 60% of its words with any prompt of every set written before it."""
    harmful, harmless = (
        PromptSet.load(f"builtin:harmful_holdout_{suffix}"),
        PromptSet.load(f"builtin:harmless_holdout_{suffix}"),
    )
    assert len(harmful) == len(harmless) == 80
    assert set(Counter(harmful.categories or ()).values()) == {10}
    harmless_categories = Counter(harmless.categories or ())
    assert harmless_categories["general"] == harmless_categories["xstest_style"] == 12
    assert {harmless_categories[c] for c in set(harmful.categories or ())} == {7}
    check_disjoint(harmful, harmless)
    names = [
        "harmful",
        "harmless",
        "harmless_extra",
        "harmless_extra_2",
        "harmful_holdout",
        "harmless_holdout",
        *[f"{kind}_holdout_{n}" for n in range(2, int(suffix)) for kind in ("harmful", "harmless")],
    ]
    other_words = [_words(p) for name in names for p in PromptSet.load(f"builtin:{name}")]
    for prompt in (*harmful, *harmless):
        words = _words(prompt)
        assert max(len(words & o) / len(words | o) for o in other_words) < 0.6, prompt
    with pytest.raises(LensSafetyError, match="has no splits"):
        PromptSet.load(f"builtin:harmless_holdout_{suffix}:val")


def test_second_training_only_benign_set_stays_out_of_every_held_out_set():
    extra_2 = PromptSet.load("builtin:harmless_extra_2")
    assert len(extra_2) == 89 and len(set(extra_2.prompts)) == len(extra_2)
    for spec in ("harmful", "harmless", "harmless_extra", "harmful_holdout", "harmless_holdout"):
        check_disjoint(extra_2, PromptSet.load(f"builtin:{spec}"))
    held_out = [
        p
        for k in ("harmless", "harmful")
        for s in ("val", "test")
        for p in PromptSet.load(f"builtin:{k}:{s}")
    ]
    held_out += list(PromptSet.load("builtin:harmless_holdout"))
    held_words = [_words(p) for p in held_out]
    for prompt in extra_2:
        words = _words(prompt)
        assert max(len(words & o) / len(words | o) for o in held_words) < 0.5, prompt
    with pytest.raises(LensSafetyError, match="has no splits"):
        PromptSet.load("builtin:harmless_extra_2:train")


def test_duplicates_across_classes_are_refused():
    with pytest.raises(LensSafetyError, match="appear in both"):
        check_disjoint(PromptSet.from_list(["x", "y"], "a"), PromptSet.from_list(["y"], "b"))


def test_hash_changes_with_content():
    assert PromptSet.from_list(["a", "b"]).sha256 != PromptSet.from_list(["b", "a"]).sha256


def test_weights_fingerprint_ignores_non_weight_safetensors(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from lens_safety.hashing import weights_fingerprint

    copy = tmp_path / "model"
    shutil.copytree(tiny_dirs["llama"], copy)
    before = weights_fingerprint(copy)
    import torch

    save_file({"direction": torch.ones(3)}, copy / "direction.safetensors")
    assert weights_fingerprint(copy) == before
    save_file({"x": torch.ones(3)}, copy / "model.safetensors")
    assert weights_fingerprint(copy) != before


def test_concat_keeps_order_and_labels():
    harmful = PromptSet.load("builtin:harmful_holdout_2").head(3)
    joined = PromptSet.concat(harmful, ["Bake bread?", "Fold a shirt?"], name="mixed")
    assert joined.prompts == (*harmful.prompts, "Bake bread?", "Fold a shirt?") and joined.name == "mixed"
    assert joined.categories == (*(harmful.categories or ()), None, None)
    assert PromptSet.concat(["a"], ["b"]).categories is None
    with pytest.raises(LensSafetyError, match="no prompt sets"):
        PromptSet.concat()
