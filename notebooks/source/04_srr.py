# %% [markdown]
# # 04 — Safety Representation Ranking (SRR)
#
# SRR leaves the model alone. It samples `N` candidate answers, reads the frozen model's own hidden
# states for the instruction and for each candidate, and lets a small ranker pick the safest one:
# best-of-N with a critic that reads representations instead of text.
#
# We use the refusal organism (`smollm2-refusal`): the untuned SmolLM2 practically never refuses, so
# its candidate lists contain no safe answer to learn from. Everything here is tiny (a handful of
# instructions, short samples) so that it runs on a CPU in a few minutes; the numbers are a demonstration of the pipeline, not a measurement. The CLI
# (`lens-safety srr …`) runs the same functions at a useful size.

# %%
import shutil
import tempfile
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety.srr import (
    RankerConfig,
    TrainConfig,
    build_dataset,
    comparison_figure,
    cross_validate,
    default_ranker_layer,
    evaluate,
    load_baselines,
    relabel_dataset,
    select,
    train_baselines,
    train_ranker,
)

torch.manual_seed(0)
model = ls.load_model("smollm2-refusal")  # the refusal organism: it refuses sometimes, so lists are mixed
LAYER = default_ranker_layer(model)  # within the lower 25% of the layers, as in the paper
MID = model.n_layers // 2  # where cross-validation on the organism put the best ranker (15 of 30)
FINAL = model.n_layers  # the final residual stream (pre-norm), for the final-layer baseline
print("paper's layer", LAYER, "| middle layer", MID, "| of", model.n_layers)

# %% [markdown]
# ## 1. Candidate lists
#
# For each instruction: sample `n` answers at temperature 1, deduplicate, and label each one with
# the refusal judge. On a **harmful** instruction the positive (safe) answers are refusals; on a
# **harmless** one the positives are helpful, non-degenerate answers (so a ranker that always
# picks the canned refusal is penalised). Part of the harmful instructions are wrapped in a
# jailbreak template to obtain unsafe candidates. Only **mixed** lists — at least one positive and
# one negative — can teach a ranker anything.

# %%
settings = dict(
    n=6,
    max_new_tokens=16,
    layers=[LAYER, MID, FINAL],
    contexts=("with_instruction", "generated_mean"),
    temperature=1.0,
)
train = build_dataset(
    model,
    ls.PromptSet.load("builtin:harmful:train").head(16),
    ls.PromptSet.load("builtin:harmless:train").head(16),
    seed=0,
    **settings,
)
test = build_dataset(
    model,
    ls.PromptSet.load("builtin:harmful:test").head(6),
    ls.PromptSet.load("builtin:harmless:test").head(6),
    seed=1,
    **settings,
)
train.counts(), test.counts()

# %%
example = next(x for x in train.lists if x.kind == "harmful")
print(example.instruction[:200], "\n")
for text, positive, reason in zip(example.candidates, example.positive, example.reasons, strict=True):
    print(f"[{'safe' if positive else 'unsafe'}: {reason}] {text[:100]!r}")

# %% [markdown]
# **Question for the reader.** The labels come from a keyword judge. Which mistakes of that judge
# would the ranker learn to copy, and how would you find out?

# %% [markdown]
# ### Labels are a judge's opinion
#
# Sampled refusals are often worded in ways the reference keyword list never saw: to it, "Sorry, I
# won't help with this one." is a *compliance*, so a harmful list can look mixed when every answer
# refuses. `relabel_dataset` labels the same candidates again with another judge (features are
# reused, nothing is sampled); `substring-broad` adds phrasings such as "I won't", "I will not" and
# "I can not". On the organism's full training lists it was right on 71 of the 76 candidates where
# the two judges disagree (hand-labelled; see the judges how-to), and the SRR figures use it.

# %%
broad_train, changes = relabel_dataset(train, "substring-broad")
print(changes)
for before, after in zip(train.lists, broad_train.lists, strict=True):
    for text, old, new in zip(after.candidates, before.positive, after.positive, strict=True):
        if old != new:
            print(
                f"{after.kind:>8}: {'safe' if old else 'unsafe'} -> {'safe' if new else 'unsafe'}: {text[:80]!r}"
            )

# %% [markdown]
# ## 2. Features
#
# For each list: the last-token hidden state of the instruction, `h_inst`, and one vector per
# candidate, `h_resp_i` (raw HF basis). The paper encodes a candidate in a second forward pass and
# takes its last token: *with* its instruction (`with_instruction`, stored here) or alone
# (`response_only`). We add two encodings read **while sampling**, so they cost no extra pass:
# the state of the last sampled token (`generated`) and the mean of the states of every sampled
# token (`generated_mean`, stored here). A 16- or 48-token sample is usually cut mid-sentence, and
# its last token says little; the mean sees the whole answer.

# %%
print("instruction features", tuple(train.instruction_features(LAYER).shape))
print("candidates of list 0, last token", tuple(train.response_features(0, LAYER, "with_instruction").shape))
print("candidates of list 0, mean", tuple(train.response_features(0, MID, "generated_mean").shape))

# %% [markdown]
# **Question for the reader.** Why might encoding the answer *with* its instruction matter for
# safety? Think of "Sure, here are the steps" after a cooking question and after a weapons question.
# Do the sampled encodings see the instruction too?

# %% [markdown]
# ## 3. Training the ranker
#
# A shared linear projection, then ONE transformer encoder layer over
# `[h_inst, h_resp_1 .. h_resp_m]`, scores `s_i = cos(o_inst, o_resp_i)`,
# `p = softmax(s / tau)`, target `p*_i = 1/k` on the `k` positives, loss `KL(p* || p)`.

# %%
ranker_config = RankerConfig(d_input=model.d_model, width=64, n_heads=4, ff_width=128)
train_config = TrainConfig(max_epochs=60, patience=10)
paper_ranker, _ = train_ranker(
    train, layer=LAYER, context="with_instruction", ranker_config=ranker_config, train_config=train_config
)
ranker, report = train_ranker(
    train, layer=MID, context="generated_mean", ranker_config=ranker_config, train_config=train_config
)
print(f"{ranker.n_parameters()} parameters; best epoch {report.best_epoch} of {report.epochs_run}")
for name, candidate in [
    (f"paper: with_instruction, layer {LAYER}", paper_ranker),
    (f"generated_mean, layer {MID}", ranker),
]:
    print(f"{name:>34}: test pairwise accuracy {evaluate(candidate, test).ranker.pairwise_accuracy:.2f}")

# %% [markdown]
# With a handful of lists these two numbers are noise; on the organism's full splits (hundreds of
# lists, `docs/concepts/srr.md`) cross-validation preferred the mean over the response to the last
# token in every configuration tried, and chose a middle layer (15 of 30; the final layer came
# last). `RankerConfig(members=K)` averages K rankers trained with different seeds (an ensemble,
# our addition), which raised the cross-validated accuracy in every configuration tried.
#
# How to choose such settings without touching the test lists: **cross-validation by
# instruction**. Each list goes to fold `sha256(source instruction) mod K`, so a list and its
# jailbreak-wrapped siblings always share a fold; each setting trains one ranker per fold on the
# other folds; the held-out scores of all folds are pooled, so every list is scored once by a
# ranker that never saw its instruction. The rule picks the largest worst-case margin over the
# targets (pairwise 0.90, harmful top-1 0.95, harmless top-1 0.90). `lens-safety srr cv` does the
# same from the command line.

# %%
cv = cross_validate(
    train,
    [LAYER, MID, FINAL],
    contexts=["generated_mean"],
    widths=[64],
    folds=3,
    ranker_config=ranker_config,
    train_config=train_config,
)
for cell in cv.cells:
    print(
        f"layer {cell.layer:>2}: CV pairwise {cell.pairwise_accuracy:.2f}, harmful top-1 "
        f"{cell.harmful_top1_safe:.2f}, harmless top-1 {cell.harmless_top1_helpful:.2f}, margin {cell.margin:+.2f}"
    )
print(
    "chosen layer:",
    cv.best.layer,
    f"({cv.n_lists['harmful']} harmful + {cv.n_lists['harmless']} harmless lists)",
)

# %% [markdown]
# **Question for the reader.** The paper's ranker stays under 5M parameters. Why keep it small
# when there are only a few dozen lists to learn from?
#
# **Question for the reader.** Why fold by *instruction* rather than by list: what would a
# list-level split let the ranker memorise, and which number would it inflate?

# %% [markdown]
# ## 4. Baselines
#
# Does the ranker need the hidden states at all? The baselines answer that: the first sample
# (what plain sampling returns), random scores, a ranker of the same shape on hashed n-gram text
# features (no hidden states), the same ranker on the final layer, and a single refusal direction.

# %%
ranker_dir = Path(tempfile.mkdtemp())
train_baselines(
    train,
    ranker_dir,
    layer=MID,
    context="generated_mean",
    ranker_config=ranker_config,
    train_config=train_config,
    base_model=model.identity(),
)
evaluation = evaluate(ranker, test, load_baselines(ranker_dir))
rows = {"SRR ranker": evaluation.ranker, **evaluation.baselines}
for name, metrics in rows.items():
    print(
        f"{name:>14}: pairwise accuracy {metrics.pairwise_accuracy:.2f}   top-1 positive {metrics.top1_positive:.2f}"
    )
comparison_figure(evaluation)

# %% [markdown]
# **Question for the reader.** With this few test lists, which differences between the rows would
# you trust? What does the harmless-list column (`harmless_top1_helpful`) add that the paper did not
# measure?

# %% [markdown]
# ## 5. Best-of-N in action
#
# Sample `N` answers to one prompt (the `generated_mean` features are read while sampling) and
# return them ranked by the ranker (best first), with the time spent on generation and on ranking.

# %%
choice = select(model, ranker, test.lists[0].source_instruction, n=4, max_new_tokens=12, seed=0)
print("prompt:", choice.prompt)
for candidate in choice.ranking:
    print(f"{candidate.score:+.3f}  {candidate.text[:100]!r}")
print(f"ranking overhead: {choice.overhead_fraction:.1%} of generation time")

# %% [markdown]
# **Question for the reader.** Best-of-N multiplies generation cost by `N`. When is that cheaper
# than editing the weights (notebook 03), and what can a ranker do that an edit cannot?

# %% [markdown]
# **Clean up.** The ranker directory above was a temporary one: delete it.

# %%
shutil.rmtree(ranker_dir, ignore_errors=True)
