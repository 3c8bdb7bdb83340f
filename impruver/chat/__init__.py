"""Talking to a trained model: ``impruver chat`` (:mod:`impruver.chat.repl`) and ``impruver serve``
(:mod:`impruver.chat.server`, an OpenAI-compatible HTTP API).

Both load whatever the run left in ``output_dir`` (:mod:`impruver.chat.load`: a full model, a merged export or a
LoRA adapter on its base) and share prompts, history trimming, streaming and function-call parsing
(:mod:`impruver.chat.generate`). Nothing here imports torch at module level.
"""
