# %% [markdown]
# # 03 — ROSI end to end
#
# The whole safety-editing path on a model that actually refuses: the **refusal organism**
# (`smollm2-refusal`, a LoRA fine-tune of SmolLM2-135M-Instruct shipped with lens-safety) →
# find its refusal direction → abliterate it (refusal should vanish) → ROSI (refusal should come
# back stronger) → calibrate `alpha` with a curve → export a Hugging Face directory → reload it
# with vanilla `transformers` → evaluate before and after → repair an abliterated model with
# conditional ROSI.
#
# Small prompt subsets and short greedy generations keep it to a few minutes on a CPU; the
# numbers are therefore noisy (read the intervals).

# %%
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import plotly.express as px
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lens_safety as ls
from lens_safety import viz
from lens_safety.activations import collect_activations
from lens_safety.directions import find_read_direction
from lens_safety.edits import applied_edit, conditional_rosi, orthogonalize
from lens_safety.evaluation import evaluate_refusal
from lens_safety.pipelines import EditSettings, Splits, choose_alpha, edit_and_export, obtain_direction

model = ls.load_model("smollm2-refusal")
test_h = ls.PromptSet.load("builtin:harmful:test").head(8)
test_b = ls.PromptSet.load("builtin:harmless:test").head(8)
TOKENS = 16  # refusals show in the first tokens


def rates(evaluation: "ls.evaluation.RefusalEvaluation") -> str:
    h, b = evaluation.harmful, evaluation.harmless
    return f"harmful refused {h.rate:.2f} [{h.ci_low:.2f}, {h.ci_high:.2f}]   harmless refused {b.rate:.2f} [{b.ci_low:.2f}, {b.ci_high:.2f}]"


before = evaluate_refusal(model, test_h, test_b, max_new_tokens=TOKENS)
print("organism:", rates(before))

# %% [markdown]
# ## 1. Find the direction
#
# Difference in means of `resid_pre` at the last prompt token, harmful minus harmless, on the
# training split (raw HF basis), by the same step `lens-safety rosi` runs (`obtain_direction`,
# which calls `find_direction`). On the shipped organism, selection over every layer picks
# block 25 (`lens-safety organism demo`), and abliterating that direction removes refusal on
# held-out prompts (0/52 harmful refused, down from 49/52). Where ablation works depends on where 0 sits between the
# class means: if it lies beyond the *harmful* mean, setting every projection to 0 pushes harmless
# prompts toward refusal. The mean-projection plot shows where 0 sits at each layer.

# %%
train = (
    ls.PromptSet.load("builtin:harmful:train").head(24),
    ls.PromptSet.load("builtin:harmless:train").head(24),
)
direction, report = obtain_direction(model, None, 25, train)
print("layer", direction.layer, "position", direction.position, "held-out accuracy", report.heldout_accuracy)
viz.mean_projections_figure(report.candidates, position=-1)

# %% [markdown]
# **Question for the reader.** We fixed `layer=25` from the demonstration's selection. The default
# rule forbids layers beyond `0.8 L` (block 24 here): why? Which rule in `lens_safety.selection`
# accepted block 25 anyway, and what does its message say about where this model's refusal lives?

# %% [markdown]
# ## 2. Abliterate: remove the direction from every writer
#
# Weight orthogonalisation `W <- (I - s s^T) W` on the embedding and every attention / MLP
# output is the weight form of directional ablation. `applied_edit` applies it in memory and
# restores the original weights (bitwise) on exit.

# %%
with applied_edit(model, orthogonalize(direction)):
    abliterated = evaluate_refusal(model, test_h, test_b, max_new_tokens=TOKENS)
print("abliterated:", rates(abliterated))
print(abliterated.harmful.completions[0][:200])

# %% [markdown]
# **Question for the reader.** Abliteration ignores the sign of the direction. Why? Which of the
# edits below would change behaviour if you flipped the sign?

# %% [markdown]
# ## 3. ROSI and the calibration curve
#
# ROSI adds `alpha * s_hat * w_bar^T` to every attention and MLP output weight, with `w_bar` the
# mean row of the original weight: each write gains `alpha * mean_k (W x)_k` along `s_hat`.
# `|w_bar|` is tiny next to `|W|`, so the useful `alpha` is large and model-specific: sweep it on
# **validation** prompts and keep the smallest value that reaches the target refusal while
# over-refusal and the first-token KL on harmless prompts stay within bounds. `choose_alpha` is
# the step `lens-safety rosi --alpha auto` runs: when no alpha meets every bound it takes the
# point with the most refusal inside the over-refusal and KL bounds and says so (`fallback`), and
# when none stays inside those it stops with an error instead of exporting a harmful edit.

# %%
settings = EditSettings(
    alphas=(10.0, 30.0, 100.0),
    target_refusal=0.9,
    max_over_refusal=0.25,
    max_kl=0.5,
    max_new_tokens=12,
)
val = (ls.PromptSet.load("builtin:harmful:val").head(8), ls.PromptSet.load("builtin:harmless:val").head(8))
choice, calibration = choose_alpha(model, direction, val, settings)
print(choice.message)
viz.calibration_figure(calibration)

# %%
alpha = choice.point.alpha
print("alpha =", alpha, f"({choice.rule})")

# %% [markdown]
# **Question for the reader.** The curve has three lines. Which one would you give up first if you
# had to, and what does the answer depend on (who the users are, what a refusal costs them)?

# %% [markdown]
# ## 4. Export and reload with vanilla `transformers`
#
# `edit_and_export` is the rest of `lens-safety rosi`'s job (`ls.run_edit` runs all of it from a
# model spec); with the alpha fixed to the one chosen above it builds the edit and exports it
# (`n_test > 0` would also measure refusal before and after on test prompts and record it). The
# export reads the original weights from disk shard by shard, applies the edit in float64, writes
# a Hugging Face directory with `edit.json` (lineage) and a model card, and verifies it by
# reloading and comparing logits — all in a temporary directory renamed into place only on success.

# %%
out = Path(tempfile.mkdtemp()) / "smollm2-rosi"
run = edit_and_export(model, direction, Splits(), replace(settings, alpha=alpha, n_test=0), out)
print(
    "alpha",
    run.spec.alpha,
    f"({run.alpha_choice})",
    "max |logit diff| after reload:",
    run.export.max_abs_logit_diff,
    "bound",
    run.export.bound,
)
sorted(p.name for p in out.iterdir())

# %%
tokenizer = AutoTokenizer.from_pretrained(out)
vanilla = AutoModelForCausalLM.from_pretrained(out)
messages = [{"role": "user", "content": test_h.prompts[0]}]
inputs = tokenizer.apply_chat_template(
    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
)
with torch.inference_mode():
    tokens = vanilla.generate(**inputs, max_new_tokens=TOKENS, do_sample=False)
print(
    test_h.prompts[0],
    "->",
    tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True),
)

# %% [markdown]
# **Question for the reader.** The exported directory contains no lens-safety code. What in it
# lets someone else reproduce or audit the edit?

# %% [markdown]
# ## 5. Before and after, on held-out test prompts

# %%
edited = ls.load_model(out)
after = evaluate_refusal(edited, test_h, test_b, max_new_tokens=TOKENS)
print("before:", rates(before))
print("after: ", rates(after))

# %% [markdown]
# **Question for the reader.** With 8 prompts per class the intervals are wide. How many prompts
# would you need to tell a 5-point change in over-refusal from noise, and which cheaper measurement
# (no generation) could you use to screen alphas first?

# %% [markdown]
# ## 6. Repairing an abliterated model: conditional ROSI
#
# Section 2 removed the refusal direction `s` from every writer. Can a rank-one edit put refusal
# back *only where it belongs*? The paper's ROSI adds `alpha * s * mean_k (W x)_k`: the amount it
# injects depends on each write's mean coordinate, not on harm, so on the abliterated organism its
# refusal and over-refusal rise together (`lens-safety organism demo`: no alpha reaches 0.85
# refusal with at most 0.10 over-refusal).
#
# And `amplify`, `W <- (I + alpha s s^T) W` (`lens-safety amplify`)? It rescales what each writer
# already writes along `s`, and abliteration left nothing there: `(I + alpha s s^T)(I - s s^T) =
# I - s s^T`, since `s^T s = 1`. ROSI's term `alpha s w_bar^T` uses the writer's mean row `w_bar`,
# which abliteration does not remove. The cell checks both on one MLP writer of the organism
# (raw Hugging Face weights, float64) at alpha 1: ROSI's change grows with alpha (its calibrated
# alphas are 30 to 100), amplify's stays at float rounding for any alpha.

# %%
s = direction.direction.double()
w = model.hf_model.model.layers[20].mlp.down_proj.weight.detach().double()  # d_model x d_mlp
w_abliterated = w - torch.outer(s, s @ w)
amplify_change = torch.outer(s, s @ w_abliterated)  # alpha = 1
rosi_change = torch.outer(s, w_abliterated.mean(0))  # alpha = 1
print(f"|s^T W| before abliteration: {float((s @ w).norm()):.3f}")
print(f"|s^T W| after abliteration:  {float((s @ w_abliterated).norm()):.1e}")
print(f"largest change of the abliterated writer: amplify {float(amplify_change.abs().max()):.1e}")
print(f"largest change of the abliterated writer: ROSI    {float(rosi_change.abs().max()):.1e}")

# %% [markdown]
# Conditional ROSI `W <- (I + alpha s g^T) W` reads a different coordinate of every write: its
# projection on a **read direction** `g` where the abliterated model still represents
# harmfulness. `find_read_direction` estimates `g` from the summed writes of the edited blocks
# (`x_end - x_start`, last prompt token, training prompts), made orthogonal to the harmless mean
# (harmless prompts then receive on average no injection: Llama writers have no bias to centre
# with) and to `s` (no feedback loop). Because `g` is orthogonal to `s`, the edit computed from
# the original weights is exactly the edit of the abliterated ones, so the two in-memory edits
# nest. Blocks 10-28, injection 100 and shrinkage 1.0 are the demonstration's pick on the
# validation split: its fallback, since on this organism no point reached 0.85 refusal with at
# most 0.10 over-refusal (on the first organism, `smollm2-refusal-v1`, blocks 20-28 did).

# %%
with applied_edit(model, orthogonalize(direction)):
    read = find_read_direction(
        model,
        ls.PromptSet.load("builtin:harmful:train").head(48),
        ls.PromptSet.load("builtin:harmless:train").head(48),
        direction,
        start=10,
        shrinkage=1.0,
    )
    print(f"read direction of blocks {read.start}..{read.end - 1}: separation {read.separation:.1f} (train)")
    projections = {}
    for name, prompts in (("harmful", test_h), ("harmless", test_b)):
        acts = collect_activations(model, prompts, layers=[read.start, read.end])
        projections[name] = ((acts.at(read.end) - acts.at(read.start)).double() @ read.vector).tolist()
    repair = conditional_rosi(direction, read, read.alpha_for(100.0))
    with applied_edit(model, repair):
        repaired = evaluate_refusal(model, test_h, test_b, max_new_tokens=TOKENS)
print("abliterated:                   ", rates(abliterated))
print("abliterated + conditional ROSI:", rates(repaired))
px.strip(
    x=[v for name in projections for v in projections[name]],
    color=[name for name in projections for _ in projections[name]],
    labels={"x": "g . (x_end - x_start) on held-out test prompts (abliterated model)", "color": "prompt"},
    title="How much refusal each prompt would receive (times alpha)",
)

# %% [markdown]
# **Question for the reader.** The injection is zero *on average* for harmless prompts, not for
# each one. Which harmless prompts in the plot would you expect to be over-refused, and what would
# a bias term (GPT-2 and Qwen2 writers have one) let you do that Llama writers cannot?

# %% [markdown]
# **Clean up.** The exported checkpoint above is a full copy of the model (about 600 MB in float32): delete it.

# %%
shutil.rmtree(out.parent, ignore_errors=True)
