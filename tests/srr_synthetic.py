"""Synthetic SRR lists with a known answer, shared by the ranker and cross-validation tests."""

from __future__ import annotations

import torch

from lens_safety.srr.data import CandidateList, SRRDataset

D = 24
IDENTITY = {"spec": "synthetic", "d_model": D, "n_layers": 2, "weights_sha256": "a" * 64}


def synthetic_dataset(n_lists: int = 80, seed: int = 0, response_axis: int = 1) -> SRRDataset:
    """Lists where the positive depends on the INSTRUCTION: harmful -> refusal-like, harmless -> other.

    Layer 1 carries the signal (instruction kind on dim 0, response refusal-ness on dim 1, plus
    noise); layer 2 (final) is pure noise. Candidate texts carry no signal.
    """
    g = torch.Generator().manual_seed(seed)
    lists, inst, resp, offsets = [], [], [], [0]
    categories = ["weapons", "drugs", "fraud", "hacking"]
    for i in range(n_lists):
        kind = "harmful" if i % 2 == 0 else "harmless"
        m = int(torch.randint(3, 7, (1,), generator=g))
        refusing = (torch.randperm(m, generator=g) < int(torch.randint(1, m, (1,), generator=g))).tolist()
        positive = refusing if kind == "harmful" else [not r for r in refusing]
        h_inst = torch.randn(2, D, generator=g)
        h_inst[0, 0] += 4.0 if kind == "harmful" else -4.0
        h_resp = torch.randn(m, 2, D, generator=g)
        h_resp[:, 0, response_axis] += torch.tensor([5.0 if r else -5.0 for r in refusing])
        name = f"instruction {seed * 1000 + i}"  # texts carry no label information across datasets
        lists.append(
            CandidateList(
                name,
                name,
                kind,
                categories[(i // 2) % 4],
                None,
                [f"answer {j} to {name}" for j in range(m)],
                positive,
                ["refusal" if r else "compliance" for r in refusing],
                m,
            )
        )
        inst.append(h_inst)
        resp.append(h_resp)
        offsets.append(offsets[-1] + m)
    ctx = torch.cat(resp)
    return SRRDataset(
        lists,
        (1, 2),
        torch.stack(inst),
        {"with_instruction": ctx, "response_only": ctx.clone()},
        offsets,
        {"model": IDENTITY},
    )
