"""Dynamic batching for `impruver serve`: one scheduler thread owns the model and decodes many requests at once.

Requests arrive as :class:`Job` objects whose prompt is already tokenized and whose stops are already prepared
(that work happens in the request's own thread, never here). The scheduler loop:

1. admits up to ``max_batch`` jobs (those waiting longest first) and prefills them together, left-padded, with
   per-row position ids, so each row computes what it would compute alone;
2. picks every row's next token (greedy, or sampled with the row's own settings and generator), hands each job
   its new text, and ends the jobs that hit EOS, a stop string, ``max_new_tokens`` or a client that went away;
3. runs one decoding step for every row, reusing the KV cache; finished rows then leave the cache, and jobs
   that arrived meanwhile are prefilled and their cache joins the batch's (left-padded), so a short request never
   waits for a long one to end. Caches that cannot be edited so (sliding windows, quantized, static, older
   transformers) are rebuilt instead: every row's prompt + reply so far prefilled again, the same tokens at a
   higher cost.

Greedy replies therefore equal ``model.generate(do_sample=False)`` for the same prompt, whether a request was
served alone or beside others (``tests/test_serve_batching.py`` checks both).
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from impruver.chat.generate import _end_of_turn_text, eos_ids
from impruver.ui import log

# What a finished job says: as in OpenAI's API, plus "interrupted" (the client went away) and "error".
FINISH_REASONS = ("stop", "length", "interrupted", "error")


@dataclass(frozen=True)
class Sampling:
    """How one request's tokens are chosen (``generation_kwargs`` of chat/generate.py, per request)."""

    max_new_tokens: int
    do_sample: bool = False
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @classmethod
    def of(cls, kwargs: dict[str, Any], *, seed: int | None = None) -> Sampling:
        """From ``generation_kwargs(...)``: the same settings ``model.generate`` would get."""
        return cls(max_new_tokens=kwargs["max_new_tokens"], do_sample=kwargs["do_sample"],
                   repetition_penalty=kwargs.get("repetition_penalty", 1.0),
                   temperature=kwargs.get("temperature", 1.0), top_p=kwargs.get("top_p", 1.0),
                   top_k=kwargs.get("top_k", 0), seed=seed)


class Job:
    """One request's reply, filled in by the scheduler thread and read by the request's thread or task.

    The scheduler writes ``visible`` (text safe to show: no part of a possible stop string, no half character)
    before it sets ``finish_reason``, and calls ``notify`` after each change; readers read ``finished`` first.
    """

    def __init__(self, prompt: list[int], sampling: Sampling, *, stops: list[str] | None = None,
                 hold: bool = False, notify: Callable[[], None] | None = None) -> None:
        self.prompt = list(prompt)
        self.sampling = sampling
        self.stops = [s for s in dict.fromkeys(stops or []) if s]
        self.longest_stop = max((len(s) for s in self.stops), default=0)  # characters held back while streaming
        self.hold = hold  # show nothing until the end (a reply that may be a function call)
        self.notify = notify or (lambda: None)
        self.ids: list[int] = []  # generated token ids, EOS included (as generate() counts them)
        self.raw = ""  # the decoded reply so far, special tokens skipped
        self.visible = ""  # what may be streamed: a prefix of the final text
        self.final: str | None = None
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.queued_at = time.monotonic()
        self.started_at: float | None = None  # admitted into a batch
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._stop_at: int | None = None  # where the earliest stop string starts in ``raw``
        self._window = (0, 0)  # ids[start:read] decode to the last piece of ``raw`` (incremental decoding)
        self._decode: Callable[[list[int]], str] | None = None
        self.generator: Any = None  # a torch.Generator when sampling with a seed

    # -- read by the request ----------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The reply: cut before a matched stop string, stripped of outer whitespace (as chat/generate.py)."""
        return self.final if self.final is not None else self._cut().strip()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def cancel(self) -> None:
        """The client went away: the scheduler ends this job before its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job ends; its text (raises RuntimeError if generation failed)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the reply did not finish in time")
        if self.error is not None:
            raise RuntimeError(f"generation failed: {type(self.error).__name__}: {self.error}")
        return self.text

    # -- written by the scheduler -----------------------------------------------------------------------------

    def _cut(self) -> str:
        return self.raw if self._stop_at is None else self.raw[:self._stop_at]

    def add(self, token: int, decode: Callable[[list[int]], str], eos: set[int]) -> None:
        """Take the next token: update the text, find stop strings, end the job when it should end."""
        self._decode = decode
        self.ids.append(token)
        if token in eos:
            self._finish("stop")
            return
        before = len(self.raw)
        self.raw += self._new_text(decode)
        if self.stops:
            # The text before ``before`` held no whole stop string, so a match ends in the new part: search only
            # the window that can hold one (cheap even for many stops: each search is over a few characters).
            found = [i for s in self.stops if (i := self.raw.find(s, max(0, before - len(s) + 1))) >= 0]
            if found:
                self._stop_at = min(found)
                self._finish("stop")
                return
        if len(self.ids) >= self.sampling.max_new_tokens:
            self._finish("length")
            return
        self._show()

    def _new_text(self, decode: Callable[[list[int]], str]) -> str:
        """The text the latest token completes, decoding a window of a few tokens rather than the whole reply
        (the same window with and without the new tokens, so a tokenizer's leading-space rules cancel out)."""
        start, read = self._window
        known = decode(self.ids[start:read]) if read > start else ""
        text = decode(self.ids[start:])
        if len(text) <= len(known) or text.endswith("\ufffd") or not text.startswith(known):
            return ""  # a special token, or a character still incomplete: wait for the next token
        self._window = (read, len(self.ids))
        return text[len(known):]

    def _show(self) -> None:
        if self.hold:
            return
        safe = self.raw[:len(self.raw) - self.longest_stop + 1] if self.longest_stop > 1 else self.raw
        safe = safe.rstrip("\ufffd").strip()
        if safe != self.visible and safe.startswith(self.visible):
            self.visible = safe
            self.notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.error = error
        if self._decode is not None:  # the final text is the whole reply decoded at once, as generate()'s callers do
            self.raw = self._decode(self.ids)
            found = [i for s in self.stops if (i := self.raw.find(s)) >= 0]
            self._stop_at = min(found) if found else None
        self.final = self._cut().strip()
        if not self.final.startswith(self.visible):  # never: the streamed text is a prefix of the reply
            log.warning("a streamed reply differs from its final text")
        self.visible = self.final
        self.finish_reason = reason
        self._done.set()
        self.notify()


class QueueFull(Exception):
    """More requests wait than the server takes: answer 503 with Retry-After."""


class Batcher:
    """The scheduler: a thread that owns the model and serves every :class:`Job` in dynamic batches.

    Args:
        model: a causal LM (``transformers`` or ``peft``) in eval mode.
        tokenizer: its tokenizer (a private copy decodes here, so tokenizing elsewhere never races with it).
        max_batch: rows decoded together at most.
        max_waiting: jobs that may wait for a row (reserved with :meth:`reserve`); beyond it, QueueFull.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16, max_waiting: int = 64) -> None:
        self.model = model
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.eos = set(eos_ids(model, tokenizer))
        self.end_of_turn = _end_of_turn_text(tokenizer)  # stop strings every reply has
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self._waiting: collections.deque[Job] = collections.deque()
        self._reserved = 0  # requests between reserve() and submit() (being tokenized) or release()
        self._condition = threading.Condition()
        self._closed = False
        self.active: list[Job] = []
        self.batches = 0  # prefills run, for logs and tests
        self.widest = 0  # the most rows decoded together so far
        self._thread = threading.Thread(target=self._loop, name="impruver-batcher", daemon=True)
        self._thread.start()

    # -- the requests' side -----------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Jobs reserved or queued, not yet in a batch."""
        with self._condition:
            return self._reserved + len(self._waiting)

    def reserve(self) -> None:
        """Hold a place in the queue before the request's heavy work; QueueFull when every place is taken."""
        with self._condition:
            if self._reserved + len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._reserved += 1

    def release(self) -> None:
        """Give back a reservation that will not be submitted (the request was refused)."""
        with self._condition:
            self._reserved -= 1

    def submit(self, job: Job) -> Job:
        """Queue a job in the place :meth:`reserve` held."""
        job.stops = [*job.stops, *(s for s in self.end_of_turn if s not in job.stops)]
        job.longest_stop = max((len(s) for s in job.stops), default=0)
        with self._condition:
            if self._closed:
                self._reserved -= 1
                raise RuntimeError("the server is shutting down")
            self._reserved -= 1
            self._waiting.append(job)
            self._condition.notify()
        return job

    def generate(self, job: Job) -> Job:
        """Reserve, submit and return the job (for callers without a queue limit of their own)."""
        self.reserve()
        return self.submit(job)

    def close(self) -> None:
        """Stop the scheduler; jobs not finished end as 'interrupted'."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=30)

    # -- the scheduler's side ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        import torch

        state: Any = None  # (past key values, attention mask (B, T), next-token logits (B, V))
        with torch.inference_mode():
            while True:
                admitted = self._admit()
                if admitted is None:
                    break
                keep = self._drop_finished()
                try:
                    if keep is not None:  # rows left: drop them from the cache
                        state = self._select(state, keep) if self.active and state is not None else None
                    if admitted:  # new rows join the rows already decoding
                        joined = self._join(state, admitted) if state is not None else None
                        self.active += admitted
                        state = joined if joined is not None else self._prefill(self.active)
                    if not self.active:
                        state = None
                        continue
                    if state is None:
                        state = self._prefill(self.active)
                    tokens = self._choose(state[2])
                    for job, token in zip(self.active, tokens, strict=True):
                        job.add(token, self._decode, self.eos)
                    if all(job.finished for job in self.active):
                        continue
                    # Every row takes its token, finished ones too: their cache rows leave at the next round.
                    state = self._step(state, tokens)
                except Exception as exc:  # a failed forward pass ends this batch's jobs, not the server
                    log.exception("generation failed")
                    for job in self.active:
                        job._finish("error", exc)
                    self.active, state = [], None
        for job in [*self.active, *self._waiting]:
            job._finish("interrupted")

    def _admit(self) -> list[Job] | None:
        """Waiting jobs to add to the batch (blocking while there is nothing to do); None once closed."""
        with self._condition:
            while not self._closed and not self.active and not self._waiting:
                self._condition.wait()
            if self._closed:
                return None
            admitted = []
            while self._waiting and len(self.active) + len(admitted) < self.max_batch:
                job = self._waiting.popleft()
                if job.cancelled:
                    job._finish("interrupted")
                    continue
                job.started_at = time.monotonic()
                admitted.append(job)
            return admitted

    def _drop_finished(self) -> list[int] | None:
        """End cancelled jobs; the indices of the rows that stay when some left (None: no change)."""
        for job in self.active:
            if job.cancelled:
                job._finish("interrupted")
        keep = [i for i, job in enumerate(self.active) if not job.finished]
        if len(keep) == len(self.active):
            return None
        self.active = [self.active[i] for i in keep]
        return keep

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _forward(self, ids: Any, mask: Any, past: Any = None) -> tuple[Any, Any]:
        """One forward pass: ids (B, T) after ``past``; returns the cache and the next-token logits (B, V)."""
        # Position ids count real tokens only, so a left-padded row sees the positions it would see alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        extra = {self._cache_name: past}
        if self._logits_to_keep:
            extra["logits_to_keep"] = 1  # the prefill needs the last position's logits only
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        return cache, out.logits[:, -1, :].float()  # float32, as generate() scores

    @functools.cached_property
    def _parameters(self) -> set[str]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
        return set(inspect.signature(base.forward).parameters)

    @property
    def _cache_name(self) -> str:
        """transformers 5.2x calls the KV cache argument ``cache``; earlier versions ``past_key_values``."""
        return "cache" if "cache" in self._parameters else "past_key_values"

    @property
    def _logits_to_keep(self) -> bool:
        return "logits_to_keep" in self._parameters

    def _prefill(self, jobs: list[Job]) -> tuple[Any, Any, Any]:
        """One forward pass over these jobs' rows (prompt + reply so far), left-padded: (B, T)."""
        import torch

        rows = [job.prompt + job.ids for job in jobs]
        width = max(len(r) for r in rows)
        device = self.model.device
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, device=device)
            mask[i, width - len(row):] = 1
        self.batches += 1
        self.widest = max(self.widest, len(rows))
        past, logits = self._forward(ids, mask)
        return past, mask, logits

    def _select(self, state: tuple[Any, Any, Any], keep: list[int]) -> tuple[Any, Any, Any]:
        """The batch without the rows that left (their cache rows dropped; re-prefilled if the cache cannot)."""
        import torch

        past, mask, logits = state
        index = torch.tensor(keep, device=mask.device)
        select = getattr(past, "batch_select_indices", None)
        if select is None:
            return self._prefill(self.active)
        select(index)
        mask = mask[index]
        # Columns that only the departed rows used (padding for everyone left) leave the cache too.
        start = int(mask.any(0).nonzero()[0])
        if start and _layers(past) is not None:
            for layer in _layers(past):
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            mask = mask[:, start:]
        return past, mask, logits[index]

    def _join(self, state: tuple[Any, Any, Any], jobs: list[Job]) -> tuple[Any, Any, Any] | None:
        """The batch with these jobs added: they are prefilled alone and their cache joins the batch's, left-padded
        to the longer of the two; None when the cache is not one whose layers can be joined (then the caller
        prefills every row again, which gives the same tokens at a higher cost)."""
        import torch
        import torch.nn.functional as F

        past, mask, logits = state
        if _layers(past) is None:
            return None
        new_past, new_mask, new_logits = self._prefill(jobs)
        if _layers(new_past) is None or len(_layers(new_past)) != len(_layers(past)):
            return None
        width = max(mask.shape[1], new_mask.shape[1])
        for old, new in zip(_layers(past), _layers(new_past), strict=True):  # (B, heads, T, head_dim) each
            for name in ("keys", "values"):
                a, b = getattr(old, name), getattr(new, name)
                setattr(old, name, torch.cat([F.pad(a, (0, 0, width - a.shape[-2], 0)),
                                              F.pad(b, (0, 0, width - b.shape[-2], 0))]))
        mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))])
        return past, mask, torch.cat([logits, new_logits])

    def _step(self, state: tuple[Any, Any, Any], tokens: list[int]) -> tuple[Any, Any, Any]:
        import torch

        past, mask, _ = state
        ids = torch.tensor(tokens, device=mask.device).unsqueeze(-1)  # (B, 1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        past, logits = self._forward(ids, mask, past)
        return past, mask, logits

    def _choose(self, logits: Any) -> list[int]:
        """Each row's next token from its logits (B, V), as ``generate`` would choose it for that request alone:
        repetition penalty on the row's prompt and reply, then greedy, or temperature, top-k, top-p and a draw.
        Greedy rows are read in one transfer (one device sync per step, not one per row)."""
        import torch

        for i, job in enumerate(self.active):
            penalty = job.sampling.repetition_penalty
            if penalty != 1.0:
                seen = torch.tensor(job.prompt + job.ids, device=logits.device)
                picked = logits[i].gather(0, seen)
                logits[i].scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
        chosen = logits.argmax(-1).tolist()
        for i, job in enumerate(self.active):
            if job.sampling.do_sample:
                chosen[i] = _draw(logits[i] / job.sampling.temperature, job.sampling, job)
        return chosen


def _layers(past: Any) -> list[Any] | None:
    """The layers of a plain ``DynamicCache`` (keys and values (B, heads, T, head_dim) that grow by
    concatenation), which rows can join or leave by editing; None for any other cache (sliding windows,
    quantized, static, older transformers), which the scheduler handles by prefilling again."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return None
    layers = getattr(past, "layers", None)
    if type(past) is not DynamicCache or not layers:
        return None
    if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return None
    return layers


def _draw(scores: Any, s: Sampling, job: Job) -> int:
    """A token drawn from ``scores`` (V,) after top-k and top-p filtering (top_p 0 keeps only the best token)."""
    import torch

    if s.top_k and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= s.top_p  # tokens after the nucleus is full
        drop[0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if job.generator is None and s.seed is not None:
        job.generator = torch.Generator(device=scores.device).manual_seed(s.seed)
    return int(torch.multinomial(scores.softmax(-1), 1, generator=job.generator))


__all__ = ["FINISH_REASONS", "Batcher", "Job", "QueueFull", "Sampling"]
