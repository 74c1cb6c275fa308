"""The MoE feed-forward block: a router and N copies of a layout's FFN, top-k routing.

Routing is Mixtral's: the router (a linear map, no bias) gives each token one logit per expert;
the token goes to the ``top_k`` experts with the highest logits, weighted by the softmax over
those k logits only (equal to a softmax over all N renormalized over the chosen k, which is what
``MixtralForCausalLM`` computes), and the block's output is the weighted sum of their outputs.

The load-balancing auxiliary loss is Switch/Mixtral's ``N * sum_j f_j * P_j``: ``f_j`` the share
of the token-to-expert assignments that went to expert j, ``P_j`` the mean router probability
(softmax over all N) of expert j. It is 1 when routing is uniform and grows as it concentrates;
the model adds ``coef x`` its mean over layers to the training loss (model.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoeFeedForward(nn.Module):
    """``router`` (dim -> N) and ``experts`` (N FFNs made by ``make_ffn()``), top-k routed.

    ``last_aux_loss``: the load-balancing loss of the last forward in training mode (None in
    eval). ``routing_counts``: when not None (``start_counting``), a [N] tensor to which every
    forward adds how many token-to-expert assignments each expert received.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, make_ffn: Callable[[], nn.Module]):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts} (the experts), got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(make_ffn() for _ in range(num_experts))
        self.last_aux_loss: torch.Tensor | None = None
        self.routing_counts: torch.Tensor | None = None

    def start_counting(self) -> None:
        self.routing_counts = torch.zeros(self.num_experts, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.router(flat).float()
        top_logits, chosen = logits.topk(self.top_k, dim=-1)  # [T, k]
        gate = torch.softmax(top_logits, dim=-1)
        out = torch.zeros_like(flat)
        for j, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == j, as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(flat[token]) * gate[token, slot].unsqueeze(-1).to(flat.dtype)
            out.index_add_(0, token, y.to(out.dtype))
        if self.training:
            self.last_aux_loss = load_balancing_loss(logits, chosen, self.num_experts)
        if self.routing_counts is not None:
            self.routing_counts += torch.bincount(chosen.reshape(-1).cpu(),
                                                  minlength=self.num_experts)
        return out.reshape(shape)


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``N * sum_j f_j * P_j`` over the tokens of ``logits`` [T, N] routed to ``chosen`` [T, k]."""
    probs = torch.softmax(logits.float(), dim=-1).mean(0)
    assigned = F.one_hot(chosen.reshape(-1), num_experts).float().mean(0)
    return num_experts * (assigned * probs).sum()
