"""One optimizer for a whole model: GLM-5's split of the parameters between Muon (or Muon Split) and AdamW.

GLM-5 (report section 2.1) trains every hidden matrix with Muon and the rest with AdamW. ``build_optimizer``
makes that split for any model and returns one ``CombinedOptimizer`` that steps both:

    "adamw"       every parameter AdamW (betas 0.9, 0.95)
    "muon"        2-D hidden matrices Muon (muon.py, "match_rms_adamw" scale, so one lr serves both); the rest AdamW
    "muon_split"  as "muon", and every module that declares ``muon_blocks()`` (MLA) gets its up-projections
                  orthogonalized per head
Embeddings, the LM head (any module named lm_head, or names in ``adamw_names``) and every parameter with fewer
than 2 dims go to AdamW; 2-D embeddings/head decay, 1-D ones (norms, biases) do not (nanoGPT's rule).
``CombinedOptimizer.param_groups`` are the children's own group dicts, so LambdaLR schedules both at once.
"""

from __future__ import annotations

import torch
from torch import nn

from glm5_ref.muon import Blocks, Muon, _check_finite, closure_loss

OPTIMIZERS = ("adamw", "muon", "muon_split")


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one. ``param_groups`` and ``state`` are live views of theirs (the same group
    dicts), so torch.optim.lr_scheduler schedulers (LambdaLR, ...) drive every group. New groups go to a child:
    ``.optimizers[name].add_param_group(...)``."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = dict(optimizers)
        super().__init__([{"params": []}], defaults={})  # sets up Optimizer's hooks; the groups are the children's

    param_groups = property(lambda self: [g for o in self.optimizers.values() for g in o.param_groups],
                            lambda self, value: None)  # Optimizer.__init__ assigns [], which we ignore
    state = property(lambda self: {p: s for o in self.optimizers.values() for p, s in o.state.items()},
                     lambda self, value: None)

    def add_param_group(self, param_group: dict) -> None:
        if param_group["params"]:
            raise NotImplementedError("CombinedOptimizer.add_param_group: add the group to one of .optimizers")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for o in self.optimizers.values():  # check everything before anything changes
            _check_finite(o)
        for o in self.optimizers.values():
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"CombinedOptimizer.load_state_dict: expected keys {sorted(self.optimizers)}, "
                             f"got {sorted(state_dict)}")
        for name, o in self.optimizers.items():
            o.load_state_dict(state_dict[name])


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1,
                    adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                    muon_kwargs: dict | None = None, adamw_names=(), verbose: bool = False) -> CombinedOptimizer:
    """One optimizer for ``model``: "adamw" (everything AdamW), "muon" or "muon_split" (hidden matrices Muon)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"build_optimizer name: expected one of {OPTIMIZERS}, got {name!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"build_optimizer lr: expected a number > 0, got {lr!r}")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    blocks: dict[str, Blocks] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        prefix = mname + "." if mname else ""
        if name == "muon_split" and hasattr(module, "muon_blocks"):
            blocks.update({prefix + k: v for k, v in module.muon_blocks().items()})
        for pname, p in module.named_parameters(recurse=False):
            full = prefix + pname
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            head = isinstance(module, nn.Embedding) or mname.split(".")[-1] == "lm_head" or full in adamw_names
            if p.dim() < 2:
                groups["adamw_no_decay"].append((full, p))
            elif head or name == "adamw":
                groups["adamw"].append((full, p))
            elif p.dim() == 2:
                groups["muon"].append((full, p))
            else:
                raise ValueError(f"build_optimizer: parameter {full} of shape {tuple(p.shape)} fits no group "
                                 "(Muon takes 2-D matrices; list it in adamw_names to give it to AdamW)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(seen) == len(trainable) == sum(len(v) for v in groups.values()), "a parameter in no group"
    muon_names = {n for n, _ in groups["muon"]}
    for full, b in blocks.items():
        if full not in muon_names:
            raise ValueError(f"build_optimizer: muon_blocks names {full!r}, which is not a Muon parameter "
                             f"(Muon parameters: {sorted(muon_names)})")
    if verbose:
        w = max([len(n) for entries in groups.values() for n, _ in entries] + [9])
        print(f"{'parameter':<{w}} {'shape':<16} {'group':<15} blocks")
        for group, entries in groups.items():
            for full, p in entries:
                b = blocks.get(full)
                desc = f"{len(b)} blocks of {sorted({e - s for s, e in b})} rows" if b else ""
                print(f"{full:<{w}} {str(tuple(p.shape)):<16} {group:<15} {desc}")
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if groups["muon"]:
        kwargs = dict(adjust_lr_fn="match_rms_adamw") | (muon_kwargs or {})
        optimizers["muon"] = Muon([{"params": groups["muon"],
                                    "blocks": [blocks.get(n) for n, _ in groups["muon"]]}],
                                  lr=lr, weight_decay=weight_decay, **kwargs)
    adamw_groups = [{"params": groups[k], "weight_decay": wd}
                    for k, wd in (("adamw", weight_decay), ("adamw_no_decay", 0.0)) if groups[k]]
    if adamw_groups:
        optimizers["adamw"] = torch.optim.AdamW(adamw_groups, lr=adamw_lr or lr, betas=adamw_betas)
    return CombinedOptimizer(optimizers)
