"""Flow-matching Euler at a fixed list of sigmas: the schedule a flow-distilled student was trained on.

A student distilled from a flow teacher's dump (``distill train --recipe flow_kd`` / ``flow_step``)
samples with the Euler steps it was trained between: the teacher's recorded sigmas (``flow_kd``), or
every k-th of them (``flow_step``: rows 0, k, 2k, ... then 0). ``FlowMatchEulerDiscreteScheduler`` at
``num_inference_steps = S / k`` gives other sigmas (its linspace spans the whole range at any step count,
so the teacher's rows 0, k, 2k are not on it), and it keeps no list of sigmas in its config. This
subclass carries them: ``trained_sigmas`` (the S' sigmas before the final 0) and ``trained_timesteps``
(the time inputs the student was trained with at them, sigma * num_train_timesteps as the record holds
them). ``set_timesteps`` at that step count (or with no count) uses them as they are, with no shift
(they are already the teacher's shifted ones); at another count, or given ``sigmas``/``timesteps``, it
is ``FlowMatchEulerDiscreteScheduler``'s own. ``step`` is the parent's: z_{i+1} = z_i + (s_{i+1} - s_i) v.

``distill export`` copies this file into the folder's ``scheduler/`` (torch and diffusers only), like
the student's code, and names it in ``model_index.json``.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config


class TrainedSigmasFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` plus ``trained_sigmas``/``trained_timesteps``: the student's schedule."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float | None = 0.5, max_shift: float | None = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, invert_sigmas: bool = False, shift_terminal: float | None = None,
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 trained_sigmas: list[float] | None = None, trained_timesteps: list[float] | None = None):
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
                         base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
                         max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
                         use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                         use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
                         stochastic_sampling=stochastic_sampling)
        if trained_sigmas is not None:
            if trained_timesteps is not None and len(trained_timesteps) != len(trained_sigmas):
                raise ValueError(f"{len(trained_sigmas)} trained_sigmas but {len(trained_timesteps)} trained_timesteps")
            if any(b >= a for a, b in zip(trained_sigmas, trained_sigmas[1:])) or not 0 < trained_sigmas[-1] <= 1:
                raise ValueError(f"trained_sigmas {trained_sigmas} must fall strictly within (0, 1]")

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None, timesteps=None):
        trained = self.config.trained_sigmas
        if trained and sigmas is None and timesteps is None and num_inference_steps in (None, len(trained)):
            self.num_inference_steps = len(trained)
            sig = torch.tensor(list(trained), dtype=torch.float32)
            given = self.config.trained_timesteps
            ts = torch.tensor(list(given), dtype=torch.float32) if given else sig * self.config.num_train_timesteps
            self.timesteps = ts.to(device)
            self.sigmas = torch.cat([sig, torch.zeros(1)]).to(device)
            self._step_index = None
            self._begin_index = None
            return
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
