"""An exponential moving average of a model's weights, as DDPM training keeps (decay 0.9999)."""

import copy

import torch


def ema_model_state(ema_state: dict) -> dict:
    """The EMA weights of a checkpoint as a DDPM state_dict (the EMA's keys carry `module.`)."""
    return {k[len("module.") :]: v for k, v in ema_state.items() if k.startswith("module.")}


class EMA:
    """An exponential moving average of a module's parameters and floating buffers:
    ema = decay * ema + (1 - decay) * current, the first update a copy. One foreach lerp per
    update and the count on the host: no host sync (torch's AveragedModel keeps its count on the
    device and tests it each update). Its state_dict has AveragedModel's layout (`module.` keys
    and `n_averaged`), so checkpoints of either load into the other.

    warmup=True: the decay of update k (k = 0, 1, ...) is min(decay, 1 - (1 + k / inv_gamma) ^
    -power), as diffusers' EMAModel(use_ema_warmup=True) gives it (inv_gamma 1, power 2/3 by
    default; 3/4 suits shorter runs): the average follows the weights closely early, so a short
    run's EMA samples are not those of its first, random weights."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False, inv_gamma: float = 1.0,
                 power: float = 2 / 3):  # fmt: skip
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if not (inv_gamma > 0 and power > 0):
            raise ValueError(f"inv_gamma and power must be positive, got {inv_gamma!r} and {power!r}")
        self.module = copy.deepcopy(module).requires_grad_(False)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, bool(warmup), float(inv_gamma), float(power)
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses (0 for the first: a copy)."""
        k = self.num_updates
        if k == 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + k / self.inv_gamma) ** -self.power)

    def _tensors(self, module):
        params = list(module.parameters())
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        return params + buffers

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        ema, current = self._tensors(self.module), [t.detach() for t in self._tensors(module)]
        decay = self.current_decay()
        if decay == 0.0:
            torch._foreach_copy_(ema, current)
        else:
            torch._foreach_lerp_(ema, current, 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict:
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        state["n_averaged"] = torch.tensor(self.num_updates, dtype=torch.long)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(ema_model_state(state))
        self.num_updates = int(state["n_averaged"])
