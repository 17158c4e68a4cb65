"""DDIM whose timesteps start at any offset, for step-distilled students of leading-spacing teachers.

A student step-distilled from a teacher that samples with DDIM's "leading" spacing (SD-1.5's default,
``steps_offset=1``) was trained on a subset of the teacher's timesteps: with 2 student steps on a
4-step dump, [751, 251], which is leading spacing with ``steps_offset=251``. diffusers'
``StableDiffusionPipeline.__init__`` resets every ``steps_offset != 1`` to 1 when a pipeline is built
or loaded (its deprecation of old SD configs), so a plain ``DDIMScheduler`` cannot carry that offset
through an exported folder. This subclass keeps ``steps_offset=1`` and shifts the timesteps by its own
``timestep_offset - steps_offset``; ``step`` is DDIM's (each jump goes ``num_train_timesteps //
num_inference_steps`` down, whatever the offset), so sampling follows the trained jumps exactly.

``distill export`` copies this file into the folder's ``scheduler/`` (torch and diffusers only), like
the student UNet's code, and names it in ``model_index.json``.
"""

from __future__ import annotations

from diffusers import DDIMScheduler
from diffusers.configuration_utils import register_to_config


class OffsetDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` plus ``timestep_offset``: ``set_timesteps`` gives DDIM's timesteps shifted by
    ``timestep_offset - steps_offset``."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", rescale_betas_zero_snr: bool = False,
                 timestep_offset: int = 0):
        super().__init__(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
                         set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
                         thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                         clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
                         timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)

    def set_timesteps(self, num_inference_steps: int, device=None):
        super().set_timesteps(num_inference_steps, device)
        shift = self.config.timestep_offset - self.config.steps_offset
        if shift:
            self.timesteps = self.timesteps + shift
            if int(self.timesteps.max()) >= self.config.num_train_timesteps or int(self.timesteps.min()) < 0:
                raise ValueError(f"timestep_offset {self.config.timestep_offset} puts timesteps "
                                 f"{self.timesteps.tolist()} outside [0, {self.config.num_train_timesteps})")
