"""Students: efficient UNets and small decoders distilled from a Stable Diffusion teacher.

    from students.models.unet import build_unet, preset  # EfficientUNet2DConditionModel presets
    from students.models.vae import build_vae  # pruned SD decoder, TAESD (AutoencoderTiny)
    python -m students.cost.profile --presets mobilediffusion   # parameters, MACs, CPU latency vs teacher

Nothing heavy is imported here; each module imports torch/diffusers itself.
"""
