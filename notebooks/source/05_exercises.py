# ruff: noqa: E402
# %% [markdown]
# # 05 — Exercises
#
# Three exercises for a class, on the embedded SmolLM2-135M-Instruct (offline, CPU). Each has a
# **solution cell** right after it: tagged `solution` / `hide-input`, collapsed in Jupyter and
# hidden on the documentation site. Try first, then expand it. (The solutions run in CI, so they
# are known to work.)

# %%
import json
import shutil
import tempfile
from pathlib import Path

import torch

import lens_safety as ls
from lens_safety import viz
from lens_safety.directions import extract_directions

model = ls.load_model("smollm2")
harmful = ls.PromptSet.load("builtin:harmful:train").head(12)
harmless = ls.PromptSet.load("builtin:harmless:train").head(12)
LAYER = 18

# %% [markdown]
# ## Exercise 1 — the direction at another position
#
# The usual recipe reads the direction at the last token (`-1`). Read it instead at the
# `<|im_end|>` token that closes the user's turn (find its negative position with
# `model.chat.post_instruction_positions()`), at every layer.
#
# 1. Compute the candidates at that position only (`extract_directions(..., positions=(p,))`).
# 2. At layer `LAYER`, compute the cosine similarity between this direction and the `-1` one.
# 3. Plot the separation per layer of both positions (`viz.separation_figure`).
#
# **Question for the reader.** Is it the same direction? Which position separates the classes
# better in early layers, and why might a token that *closes the user's text* carry the judgement
# earlier than the assistant header?

# %% tags=["solution", "hide-input"]
ids = model.chat.token_ids(model.chat.format("x"))
positions = model.chat.post_instruction_positions()
end_of_turn = next(p for p in positions if model.tokenizer.decode([ids[p]]) == "<|im_end|>")
both = extract_directions(model, harmful, harmless, positions=(end_of_turn, -1))
cosine = float(both.unit(LAYER, end_of_turn) @ both.unit(LAYER, -1))
print(f"position {end_of_turn} vs -1 at layer {LAYER}: cosine {cosine:.3f}")
viz.separation_figure(both)

# %% [markdown]
# ## Exercise 2 — a flipped sign removes safety
#
# Harmful minus harmless points **toward** refusal. Projection-based edits (ablation,
# orthogonalisation) do not care about the sign, but adding the direction does: add `+c r` and
# `-c r` at layer `LAYER` (with `lens_safety.interventions.add_direction`) and measure the cheap
# refusal metric (log-odds of a refusal-start token at the first answer position) on held-out
# harmful prompts. Use `c = 1` and the raw (not normalised) `r`.
#
# SmolLM2 barely refuses to begin with, so `-r` has little room to lower the metric; on the
# refusal organism of notebook 03 the same flip takes refusal away.
#
# **Question for the reader.** Which sign raises the refusal metric? What would ROSI with a flipped
# `s_hat` do to an aligned model, and why does lens-safety refuse a negative ROSI `alpha`?

# %% tags=["solution", "hide-input"]
from lens_safety.interventions import add_direction
from lens_safety.selection import last_logits, refusal_metric, refusal_token_ids

refusal_ids = refusal_token_ids(model.tokenizer)
held_out = ls.PromptSet.load("builtin:harmful:val").head(8)
r = both.vector(LAYER, -1).float()


def mean_refusal_metric(prompts: ls.PromptSet) -> float:
    values = [refusal_metric(logits, refusal_ids) for logits in last_logits(model, prompts, 16, None)]
    return float(torch.cat(values).mean())


baseline = mean_refusal_metric(held_out)
with add_direction(model, r, layer=LAYER, coeff=1.0):
    toward = mean_refusal_metric(held_out)
with add_direction(model, r, layer=LAYER, coeff=-1.0):
    away = mean_refusal_metric(held_out)
print(f"baseline {baseline:.2f}   +r {toward:.2f}   -r {away:.2f}")
assert toward > baseline and toward > away

# %% [markdown]
# ## Exercise 3 — break and repair an export
#
# Export an **abliterated** SmolLM2 (`lens_safety.edits.orthogonalize` on every writer, embedding
# included) to a temporary directory. SmolLM2 ties its input embedding to `lm_head`; since the edit
# changes the embedding, the export unties them and stores the *original* embedding as `lm_head`.
#
# 1. Export, then read `config.json`: what does the export record about tying, and why?
# 2. **Break it** the way a naive exporter would: drop `lm_head.weight` from the safetensors file
#    and set `"tie_word_embeddings": true` (so `lm_head` becomes the *edited* embedding). Check it
#    with `lens_safety.export.verify_export`. What happens, and why?
# 3. **Repair it** and verify again.
#
# **Question for the reader.** Why would the broken model still produce fluent-looking text, and
# which check would a user without lens-safety need to catch it?

# %% tags=["solution", "hide-input"]
from safetensors.torch import load_file, save_file

from lens_safety.edits import orthogonalize
from lens_safety.errors import LensSafetyError
from lens_safety.export import export_edit, verify_export

spec = orthogonalize(both.unit(LAYER, -1))
out = Path(tempfile.mkdtemp()) / "smollm2-abliterated"
result = export_edit(model, spec, out)
config_file = out / "config.json"
config = json.loads(config_file.read_text())
print("untied:", result.untied, "| tie_word_embeddings:", config.get("tie_word_embeddings"))
print("verified, max |logit diff| =", result.max_abs_logit_diff)


def set_tied(tied: bool) -> None:
    config["tie_word_embeddings"] = tied
    config_file.write_text(json.dumps(config, indent=2))


index_file = out / "model.safetensors.index.json"  # present when the weights are sharded
index = json.loads(index_file.read_text()) if index_file.is_file() else None
shard = out / (index["weight_map"]["lm_head.weight"] if index else "model.safetensors")


def write_head(head: torch.Tensor | None) -> None:
    """Write the shard without (None) or with an lm_head tensor, keeping the index in step."""
    tensors = {k: v for k, v in load_file(shard).items() if k != "lm_head.weight"}
    if head is not None:
        tensors["lm_head.weight"] = head
    save_file(tensors, shard, metadata={"format": "pt"})
    if index:
        if head is None:
            index["weight_map"].pop("lm_head.weight", None)
        else:
            index["weight_map"]["lm_head.weight"] = shard.name
        index_file.write_text(json.dumps(index, indent=2))


original_head = load_file(shard)["lm_head.weight"]
write_head(None)  # break: HF will re-tie lm_head to the EDITED embedding
set_tied(True)
try:
    verify_export(model, spec, out)
    print("the broken export passed?!")
except LensSafetyError as error:
    print("broken export rejected:", error)

write_head(original_head)  # repair: the original embedding as an untied lm_head
set_tied(False)
print("repaired, max |logit diff| =", verify_export(model, spec, out)["max_abs_logit_diff"])

# %% [markdown]
# **Clean up.** The exported checkpoint above is a full copy of the model (about 600 MB in float32): delete it.

# %%
shutil.rmtree(out.parent, ignore_errors=True)
