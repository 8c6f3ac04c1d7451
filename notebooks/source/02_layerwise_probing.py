# ruff: noqa: E402
# %% [markdown]
# # 02 — Layer-wise probing
#
# A **probe** is a small classifier trained on activations. If a linear probe on layer `l`
# separates harmful from harmless prompts on *held-out* data, the information is linearly
# available there. This notebook compares a logistic probe with the one-number difference-in-means
# projection at every layer, puts confidence intervals on both, and asks what probing does and
# does not show.

# %%
import numpy as np
import torch

import lens_safety as ls
from lens_safety import viz
from lens_safety.probing import probe_activations
from lens_safety.splits import split_heldout

model = ls.load_model("smollm2")

# %% [markdown]
# ## 1. Data: split before you look
#
# Topic-paired prompts stay on the same side of the split (a harmful prompt and its harmless twin
# share a topic), so the held-out prompts are about topics the probe never saw.

# %%
harmful = ls.PromptSet.load("builtin:harmful").head(48)
harmless = ls.PromptSet.load("builtin:harmless").head(48)
(train_h, test_h), (train_b, test_b) = split_heldout(harmful), split_heldout(harmless)
ls.prompts.check_disjoint(train_h, test_h)
print(len(train_h), len(test_h), len(train_b), len(test_b))

# %% [markdown]
# Read `resid_pre` at position -1 at every third layer, once, and reuse the activations.

# %%
layers = list(range(0, model.n_layers, 3))
reads = [
    ls.collect_activations(model, p, layers=layers).tensor[:, :, 0]
    for p in (train_h, train_b, test_h, test_b)
]
[r.shape for r in reads]

# %% [markdown]
# **Question for the reader.** Why must the split be decided *before* computing the direction or
# fitting the probe, and why keep topic pairs together?

# %% [markdown]
# ## 2. Probe vs mean difference, per layer
#
# * **Logistic probe**: `p(harmful | x) = sigmoid(w^T x + b)`, L2-regularised, fitted on the training
#   split; accuracy thresholds at `w^T x + b = 0`, AUROC uses `w^T x + b`.
# * **Mean difference**: `s(x) = r_hat^T x` with `r = mean_harmful - mean_harmless` (training split),
#   thresholded at the midpoint of the two training class-mean projections.
#
# Both are scored on the held-out prompts; the bands are 95% percentile-bootstrap intervals (each
# class resampled separately).

# %%
report = probe_activations(*reads, layers, n_bootstrap=200)
viz.probe_accuracy_figure(report)

# %%
viz.probe_accuracy_figure(report, metric="auroc")

# %%
[
    (
        r.layer,
        round(r.probe_accuracy, 3),
        round(r.mean_diff_accuracy, 3),
        tuple(round(c, 2) for c in r.mean_diff_accuracy_ci),
    )
    for r in report.layers
]

# %% [markdown]
# **Question for the reader.** With under 20 held-out prompts per class, how wide is a 95% interval on an
# accuracy near 0.9? Would you claim that layer 9 is "better" than layer 15 from these numbers?
# What would you change to be able to?

# %% [markdown]
# ## 3. Are the layers finding the same direction?
#
# The cosine similarity of the mean-difference directions of every pair of probed layers.

# %%
viz.cosine_heatmap(report.cosine, layers, title="Cosine of mean-difference directions across layers")

# %% [markdown]
# **Question for the reader.** Neighbouring layers share most of their direction; distant ones do
# not. What does the residual stream's additive structure predict for the cosine between layer `l`
# and layer `l + 1`?

# %% [markdown]
# ## 4. What probing does not show
#
# A **control task** (Hewitt & Liang, 2019): give the probe the same activations with the class
# labels *shuffled*. A probe that still scores well on held-out data is measuring its own capacity,
# not the model's representation. With 576 dimensions and a few dozen prompts, a probe can fit the
# training set almost perfectly whatever the labels — held-out scores are what matter.

# %%
rng = np.random.default_rng(0)
pooled = torch.cat([reads[0], reads[1]])
order = torch.as_tensor(rng.permutation(len(pooled)))
shuffled_h, shuffled_b = pooled[order[: len(reads[0])]], pooled[order[len(reads[0]) :]]
control = probe_activations(shuffled_h, shuffled_b, reads[2], reads[3], layers, n_bootstrap=200)
[(r.layer, round(r.probe_accuracy, 3)) for r in control.layers]

# %% [markdown]
# And the limit that matters most here: in its later layers SmolLM2-135M-Instruct separates
# held-out harmful from harmless requests well above chance, yet it **does not refuse** them. Compare the
# cheap refusal metric (log-odds that the first answer token starts a refusal) on both classes:

# %%
from lens_safety.selection import last_logits, refusal_metric, refusal_token_ids

refusal_ids = refusal_token_ids(model.tokenizer)


def mean_refusal_metric(prompts: ls.PromptSet) -> float:
    """Mean of log P(refusal start) - log P(anything else) at the first answer token."""
    values = [refusal_metric(logits, refusal_ids) for logits in last_logits(model, prompts, 16, None)]
    return float(torch.cat(values).mean())


print("harmful :", mean_refusal_metric(test_h))
print("harmless:", mean_refusal_metric(test_b))

# %% [markdown]
# A probe shows that information is *linearly decodable*. It does not show that the model *uses*
# it, nor that it is the direction the model uses (the logistic weight vector and the mean
# difference can differ a lot and score the same). Causal tests — ablating or adding the direction
# and watching behaviour change — answer that; notebook 03 does them on a model that refuses.
#
# **Question for the reader.** Layer 0 scores at chance. Why is that guaranteed at position -1,
# and would it still be true at a position inside the user's text?
