"""Register impruver's training builders (imported by :mod:`impruver.plugins.builtin`).

* models: ``hf``, ``arch``, ``custom`` (:mod:`impruver.train.models`)
* methods: ``scratch``, ``full``, ``lora``, ``qlora`` (:mod:`impruver.train.methods`)
* optimizers: ``adamw``, ``adamw_fused``, ``adamw_8bit``, ``paged_adamw_8bit``, ``sgd``;
  schedulers: ``cosine``, ``linear``, ``constant`` (:mod:`impruver.train.optim`)

None of these modules imports torch, transformers or peft at import time.
"""

import impruver.train.methods  # noqa: F401
import impruver.train.models  # noqa: F401
import impruver.train.optim  # noqa: F401
