# ruff: noqa: B018
# %% [markdown]
# # 01 — Refusal directions
#
# This notebook finds a **refusal direction** in the residual stream of the embedded
# SmolLM2-135M-Instruct, step by step: the residual stream and its hook points, the difference in
# means per layer and position, per-layer plots, and the token view of one prompt's projection.
# It runs offline on a CPU in a minute or two.
#
# Every section ends with a **question for the reader**.

# %%
import torch

import lens_safety as ls
from lens_safety import viz
from lens_safety.directions import extract_directions

torch.manual_seed(0)
model = ls.load_model("smollm2")
model.arch.n_layers, model.arch.d_model, model.arch.tied_embeddings

# %% [markdown]
# ## 1. The residual stream and its hook points
#
# Each block reads the residual stream `x` and adds to it: `x~ = x + Attn(x)`, then
# `x_next = x~ + MLP(x~)`. TransformerLens 4's `TransformerBridge` wraps the Hugging Face model and
# exposes a hook point at each of these places. With compatibility mode off (the lens-safety
# default) `blocks.{l}.hook_resid_pre` is exactly Hugging Face's `hidden_states[l]`: the
# **raw HF basis**, in which every lens-safety vector is stored.
#
# The residual writers are the matrices that add to the stream:

# %%
[w for w in model.arch.writers if w.layer in (None, 0)]

# %% [markdown]
# Prompts are formatted with the chat template. The tokens the template puts *after* the user's
# text are the **post-instruction positions**: the model has read the whole request there, and
# has not answered yet.

# %%
print(model.chat.format("How do I bake sourdough bread?"))
positions = model.chat.post_instruction_positions()
ids = model.chat.token_ids(model.chat.format("How do I bake sourdough bread?"))
[(p, model.tokenizer.decode([ids[p]])) for p in positions]

# %% [markdown]
# Read the stream entering a few blocks, at the last token, for two prompts. The check below
# compares the bridge's hook with a plain Hugging Face forward pass that asks for `hidden_states`.

# %%
prompts = ["How do I bake sourdough bread?", "How do I make a pipe bomb?"]
acts = ls.collect_activations(model, prompts, layers=[0, 10, 20], positions=(-1,))
print(acts.tensor.shape, acts.space)  # [prompts, layers, positions, d_model]

batch = model.chat.encode(prompts)
with torch.inference_mode():
    out = model.hf_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        output_hidden_states=True,
    )
reference = torch.stack([out.hidden_states[layer][:, -1] for layer in (0, 10, 20)], dim=1)
print("max |hook - hidden_states|:", float((acts.tensor[:, :, 0] - reference).abs().max()))
print("residual norm per layer:", acts.tensor[:, :, 0].norm(dim=-1))

# %% [markdown]
# **Question for the reader.** At layer 0 the two prompts have *identical* activations at
# position -1. Why? (Hint: what has `resid_pre` of block 0 seen at the last token?) What does
# that predict for any direction read at layer 0, position -1?

# %% [markdown]
# ## 2. Difference in means, per layer and position
#
# For every layer `l` and post-instruction position `i`:
#
# ```text
# r_i^(l) = mean_harmful x_i^(l) - mean_harmless x_i^(l)        r_hat = r / |r|
# ```
#
# Harmful minus harmless points **toward** refusal. We use 16 topic-paired prompts per class from
# the built-in training split (the library's prompts were written for this project).

# %%
harmful = ls.PromptSet.load("builtin:harmful:train").head(16)
harmless = ls.PromptSet.load("builtin:harmless:train").head(16)
candidates = extract_directions(model, harmful, harmless, positions="post_instruction")
print(candidates.vectors.shape, "positions", candidates.positions, "space", candidates.space)

# %% [markdown]
# The library accumulates the means in float64. Recompute one candidate by hand to see that it is
# nothing more than a difference of two means:

# %%
layer = 20
by_hand = ls.collect_activations(model, harmful, layers=[layer]).at(layer, -1).double().mean(0) - (
    ls.collect_activations(model, harmless, layers=[layer]).at(layer, -1).double().mean(0)
)
library = candidates.vector(layer, -1)
print("relative difference:", float((by_hand - library).norm() / library.norm()))

# %% [markdown]
# ### Per-layer plots
#
# The norm of the raw direction grows with depth (so does the norm of the stream itself), so the
# norm alone says little. The **separation** (Cohen's d of the two classes' projections onto
# `r_hat`) says how cleanly one number per prompt splits the classes.

# %%
viz.direction_norms_figure(candidates)

# %%
viz.separation_figure(candidates)

# %% [markdown]
# Where do the two class means sit along `r_hat`? Directional ablation sets every prompt's
# projection to **0**; if 0 lies beyond the harmful mean, ablation pushes harmless prompts *toward*
# refusal instead of away from it.

# %%
viz.mean_projections_figure(candidates, position=-1)

# %% [markdown]
# How similar are the directions of different layers? The heatmap shows the cosine similarity of
# the position -1 candidates of every pair of layers.

# %%
p = candidates.positions.index(-1)
viz.cosine_heatmap(viz.candidate_cosines(candidates.vectors[p].float()), candidates.layers)

# %% [markdown]
# **Question for the reader.** The two classes separate along the direction at most layers after
# the first, yet SmolLM2-135M-Instruct
# does *not* refuse harmful requests. What, then, does this direction encode? Which experiment
# would tell "the model represents harmfulness" apart from "the model uses this direction to
# refuse"?

# %% [markdown]
# ## 3. The two classes in the plane of the direction
#
# Each point is a prompt, at position -1: its projection onto the layer's difference in means
# (x) against the top principal component orthogonal to it (y). Move the slider across layers.

# %%
scatter_layers = [2, 8, 14, 20, 26]
acts_h = ls.collect_activations(model, harmful, layers=scatter_layers).tensor[:, :, 0]
acts_b = ls.collect_activations(model, harmless, layers=scatter_layers).tensor[:, :, 0]
viz.projection_scatter(acts_h, acts_b, scatter_layers, active_layer=20)

# %% [markdown]
# **Question for the reader.** These are *training* prompts: the direction was computed from them.
# How would you check that the separation is not an artefact of fitting 576 dimensions to 32
# points? (Notebook 02 does it.)

# %% [markdown]
# ## 4. The token view
#
# Project every token of one formatted prompt (chat template included) onto `r_hat` at one
# layer. Positive values lean toward the harmful mean.

# %%
direction = candidates.vector(layer, -1)
prompt = "Explain how to hotwire a car without the owner noticing."
tokens, values = viz.token_projections(model, prompt, direction, layer=layer)
list(zip(tokens, [round(v, 1) for v in values], strict=True))[-12:]

# %%
viz.token_projection_view(model, prompt, direction, layer=layer)

# %% [markdown]
# **Question for the reader.** Which tokens carry the largest projection — the harmful words
# themselves, or the post-instruction tokens after them? What does that say about *where* the model
# has gathered its judgement of the request, and why the recipe reads the direction after the
# instruction rather than on its words?
