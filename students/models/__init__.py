"""Student modules only (no I/O, no schedule, no loss): the efficient UNet and its blocks, small decoders,
the teacher-feature discriminator, and students cut from the teacher's own UNet (BK-SDM, SnapFusion)."""
