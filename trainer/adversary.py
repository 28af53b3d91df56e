"""Robust training's adversary, also the attack's tokens (attack.py): continuous tokens appended to the concept's
text encoding, fitted so the model predicts the concept again. Inside training (settings.adversarial_steps) a few of
its steps run against the current student every few iterations, and the erase term is applied with its tokens too
(AdvUnlearn's recipe, on the deltas and the learnable prompt).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

from .conditioning import Cond, weighted_mse

Predict = Callable[[torch.Tensor, torch.Tensor, List[Cond]], torch.Tensor]
INIT_NOISE = 0.1  # of the concept encoding's std: distinct tokens (identical ones get identical gradients forever)


class Adversary:
    """Adversarial tokens [count, width] appended to a concept's context, with their own Adam (its moments are kept
    from one call of step to the next, so an inner loop starts where the last one ended)."""

    def __init__(self, count: int, learning_rate: float, generator: torch.Generator):
        self.count = count
        self.learning_rate = learning_rate
        self.generator = generator
        self.tokens: Optional[torch.nn.Parameter] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def start(self, concepts: Sequence[Cond]) -> None:
        """First call only: copies of the concept's last token, slightly apart, on the concept's device."""
        if self.tokens is not None:
            return
        context = concepts[0]["c_crossattn"].detach().float()
        noise = torch.randn((self.count, context.shape[-1]), generator=self.generator).to(context.device)
        tokens = context[0, -1:].expand(self.count, -1) + noise * INIT_NOISE * context.std()
        self.tokens = torch.nn.Parameter(tokens.clone())
        self.optimizer = torch.optim.Adam([self.tokens], lr=self.learning_rate)

    def append(self, cond: Cond, detach: bool = False) -> Cond:
        tokens = self.tokens.detach() if detach else self.tokens
        context = cond["c_crossattn"]
        tokens = tokens.to(context.dtype).unsqueeze(0).expand(context.shape[0], -1, -1)
        return dict(cond, c_crossattn=torch.cat([context, tokens], dim=1))

    def step(self, predict: Predict, x_t: torch.Tensor, sigma: torch.Tensor, concepts: Sequence[Cond],
             target: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One Adam step on the tokens toward predict(x_t, sigma, concepts + tokens) == target; returns the loss
        before the step. Only the tokens get a gradient: a trainer's parameters on the same graph are untouched."""
        out = predict(x_t, sigma, [self.append(c) for c in concepts])
        loss = weighted_mse(out, target, weights)
        (grad,) = torch.autograd.grad(loss, [self.tokens])
        self.tokens.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
