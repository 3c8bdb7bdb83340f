"""Register impruver's built-in builders. Imported through the ``impruver_plugins`` entry point.

Each module below registers its builders with the registry decorators when imported; none imports torch,
transformers or datasets at module level, so listing and planning stay fast.
"""

import impruver.families  # noqa: F401  model families: gpt2, llama, mistral, qwen2, qwen3
import impruver.data.formats  # noqa: F401  formats: instruct, saiga, sharegpt, openai, roleplay, text, reasoning
import impruver.data.preference  # noqa: F401  preference formats: trl, kto, alpaca / sharegpt / openai pairs
import impruver.objectives  # noqa: F401  objectives: sft, dpo, ipo, orpo, simpo, kto
import impruver.data.templates  # noqa: F401  chat templates: saiga, zephyr, chatml, ...
import impruver.data.tokenizers  # noqa: F401  tokenizers: hf, bpe
import impruver.train.builders  # noqa: F401  models, methods, optimizers, schedulers
import impruver.strategies  # noqa: F401  distribution strategies: none, ddp, fsdp, deepspeed_zero2/3
