"""Model, method, optimizer and scheduler builders (placeholders: being written by the training work)."""
from impruver.registry import methods, models, optimizers, schedulers

for _name in ("hf", "arch", "custom"):
    models.register(_name, func=lambda **kw: None)
for _name in ("scratch", "full", "lora", "qlora"):
    methods.register(_name, func=lambda **kw: None)
for _name in ("adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"):
    optimizers.register(_name, func=lambda **kw: None)
for _name in ("cosine", "linear", "constant"):
    schedulers.register(_name, func=lambda **kw: None)
