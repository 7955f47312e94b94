"""CPU speed-ups, kept out of the models: each is applied explicitly by whoever runs a model.

``cpu``: fused ``dense -> GELU`` / ``dense -> + residual`` inference and batches side by side on worker
threads, for :func:`cpu.encode`; ``cpu_dropout``: cheaper dropout masks for training on CPU. The models
stay plain ``nn.Module``s; these change speed, never the maths beyond float rounding.
"""
