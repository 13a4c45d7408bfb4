"""Vectorised next-token sampling for a whole decode batch.

Every step samples one token for each running sequence, each with its own SamplingParams. All per-row
settings become [B] tensors so the work is a handful of batched ops whatever the mix of requests; the
only Python loop is over rows with their own seed, whose noise must come from their own generator so
that a seeded request gives the same tokens whichever rows it shares the batch with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraserve.layers.cpu_kernels import cpu_kernel, fused_ops_module
from loraserve.sampling_params import SamplingParams

_PAD = -1  # pads token-id rows; mapped to an extra, discarded vocab column when counting


@dataclass
class PenaltyTensors:
    """Per-row penalty settings and the token histories they act on (right-padded with -1)."""

    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32
    output_ids: torch.Tensor  # [B, Lo] int64
    prompt_ids: torch.Tensor | None  # [B, Lp] int64; None when no row uses repetition_penalty


@dataclass
class SamplingBatch:
    """Per-step tensors for the rows sampled this step (one row per running sequence).

    Optional fields are None when no row uses the feature, which is what lets the sampler skip it.
    """

    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows so dividing is always safe
    greedy: torch.Tensor | None  # [B] bool; None when no row is greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [B] int64, 0 = disabled
    top_p: torch.Tensor | None  # [B] float32, 1 = disabled
    min_p: torch.Tensor | None  # [B] float32, 0 = disabled
    penalties: PenaltyTensors | None
    banned: tuple[torch.Tensor, torch.Tensor] | None  # (rows, token ids) forced to -inf by min_tokens
    seeded: list[tuple[int, torch.Generator]]  # non-greedy rows that draw noise from their own generator
    max_logprobs: int | None  # largest `logprobs` asked for in the batch; None when no row asks

    @property
    def plain_greedy(self) -> bool:
        """True when the whole step is an argmax of the raw logits."""
        return (self.all_greedy and self.penalties is None and self.banned is None
                and self.max_logprobs is None)

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              prompt_token_ids: list[list[int]] | None, output_token_ids: list[list[int]] | None,
              eos_token_ids: list[int], device: torch.device,
              row_eos_token_ids: list[frozenset[int]] | None = None,
              output_lengths: list[int] | None = None) -> SamplingBatch:
        """Gather the rows' settings into tensors on `device`; every list has one entry per row
        (`row_eos_token_ids`: end ids a row has beside the model's, from its adapter's tokenizer). The token
        histories are read only for penalties: without penalties they may be None, with `output_lengths`
        (for min_tokens) given instead, so a step does not copy every sequence's history."""
        n = len(params)
        if output_lengths is None and output_token_ids is None:
            raise ValueError("give output_token_ids or output_lengths (min_tokens reads how many each row has)")
        rows = {"generators": generators, "prompt_token_ids": prompt_token_ids, "output_token_ids": output_token_ids,
                "output_lengths": output_lengths}
        lengths = {name: len(values) for name, values in rows.items() if values is not None}
        for name, length in lengths.items():
            if length != n:
                raise ValueError(f"{name} has {length} rows but params has {n}; pass one entry per row")
        if n == 0:
            raise ValueError("cannot build a SamplingBatch with no rows; skip sampling when nothing runs")

        greedy = [p.greedy for p in params]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        sampled = [p for p in params if not p.greedy]
        top_k = top_p = min_p = None
        if any(p.top_k > 0 for p in sampled):
            # a top_k past the vocabulary keeps it all; capped so the tensor holds it
            top_k = torch.tensor([0 if p.greedy else min(p.top_k, 2**62) for p in params], device=device)
        if any(p.top_p < 1 for p in sampled):
            top_p = floats([1.0 if p.greedy else p.top_p for p in params])
        if any(p.min_p > 0 for p in sampled):
            min_p = floats([0.0 if p.greedy else p.min_p for p in params])

        penalties = None
        if any(p.needs_penalties for p in params):
            if prompt_token_ids is None or output_token_ids is None:
                raise ValueError("penalties need the rows' prompt_token_ids and output_token_ids")
            use_prompt = any(p.repetition_penalty != 1 for p in params)
            penalties = PenaltyTensors(
                presence=floats([p.presence_penalty for p in params]),
                frequency=floats([p.frequency_penalty for p in params]),
                repetition=floats([p.repetition_penalty for p in params]),
                output_ids=_pad_ids(output_token_ids, device),
                prompt_ids=_pad_ids(prompt_token_ids, device) if use_prompt else None,
            )

        banned_rows: list[int] = []
        banned_ids: list[int] = []
        if output_lengths is None:
            output_lengths = [len(out) for out in output_token_ids]
        for row, (p, length) in enumerate(zip(params, output_lengths, strict=True)):
            if length < p.min_tokens:
                ids = set(eos_token_ids) | set(p.stop_token_ids)
                if row_eos_token_ids:
                    ids |= row_eos_token_ids[row]
                banned_rows += [row] * len(ids)
                banned_ids += sorted(ids)
        banned = None
        if banned_rows:
            banned = (torch.tensor(banned_rows, dtype=torch.int64, device=device),
                      torch.tensor(banned_ids, dtype=torch.int64, device=device))

        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=floats([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device) if any(greedy) else None,
            all_greedy=all(greedy),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            penalties=penalties,
            banned=banned,
            seeded=[(row, g) for row, (p, g) in enumerate(zip(params, generators, strict=True))
                    if g is not None and not p.greedy],
            max_logprobs=max(asked) if asked else None,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, the sampled tokens
    logprobs: torch.Tensor | None  # [B] float32 logprob of the sampled token (None if no row asked)
    ranks: torch.Tensor | None  # [B] int64 rank of the sampled token (1 = most likely)
    top_ids: torch.Tensor | None  # [B, K] int64, K = max requested logprobs in the batch (None if 0)
    top_logprobs: torch.Tensor | None  # [B, K] float32


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row of raw logits in their own dtype (no float copy on CPU; PyTorch's own bf16 argmax is
    5x slower than widening first)."""
    kernel = cpu_kernel(fused_ops_module, logits)
    if kernel is not None and logits.is_contiguous():
        return kernel.argmax(logits)
    return logits.float().argmax(dim=-1)


def _pad_ids(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [list(r) + [_PAD] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), width)


def _counts(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 occurrence counts; padding is counted in an extra column that is dropped."""
    ids = ids.masked_fill(ids == _PAD, vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt or output tokens), then frequency and presence (output tokens), on raw logits.

    Returns a new float32 tensor; `logits` is left untouched.
    """
    logits = logits.float()
    pen = batch.penalties
    if pen is None:
        return logits
    vocab_size = logits.shape[-1]
    output_counts = _counts(pen.output_ids, vocab_size)
    if pen.prompt_ids is not None:
        seen = (output_counts > 0) | (_counts(pen.prompt_ids, vocab_size) > 0)
        rep = pen.repetition.unsqueeze(1)
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - pen.frequency.unsqueeze(1) * output_counts
            - pen.presence.unsqueeze(1) * (output_counts > 0).float())


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      window: int) -> torch.Tensor:
    """Set to -inf, in place, every token outside its row's top-k, then outside its top-p nucleus.

    Works on each row's largest logits (torch.topk over at least `window` of them), which costs a
    fraction of sorting the vocabulary; only if some nucleus is wider than that does it sort every row.
    """
    rows, vocab = logits.shape
    if top_k is None:
        k = torch.full((rows,), vocab, dtype=torch.int64, device=logits.device)
    else:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    bounded = k < vocab  # rows whose kept set is known to lie inside the window
    width = int(torch.where(bounded, k, 1).max())
    if top_p is not None:
        width = max(width, window)
    width = min(width, vocab)
    values = logits.topk(width, dim=-1).values  # descending
    keep = torch.arange(width, device=logits.device) < k.unsqueeze(1)
    if top_p is not None:
        kept = values.masked_fill(~keep, float("-inf"))
        # Renormalise over the top-k set, or over the whole row where top-k is off.
        log_z = torch.where(bounded, kept.logsumexp(dim=-1), logits.logsumexp(dim=-1))
        probs = (kept - log_z.unsqueeze(1)).exp()
        cum = probs.cumsum(dim=-1)
        open_nucleus = ~bounded & (top_p < 1) & (cum[:, -1] < top_p)
        if width < vocab and bool(open_nucleus.any()):
            return _mask_top_k_top_p_by_sort(logits, k, top_p)
        keep &= (cum - probs) < top_p.unsqueeze(1)
        keep[:, 0] = True  # the most likely token, even for a top_p that rounds to 0 in float32
        bounded |= top_p < 1
    smallest_kept = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    smallest_kept.masked_fill_(~bounded.unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < smallest_kept, float("-inf"))


def _mask_top_k_top_p_by_sort(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same masks from one ascending sort of whole rows, for nuclei too wide for the window."""
    vocab = logits.shape[-1]
    ascending, order = logits.sort(dim=-1)
    kth = ascending.gather(1, (vocab - k).unsqueeze(1))
    ascending.masked_fill_(ascending < kth, float("-inf"))
    # Drop the low tail whose mass is at most 1 - p; the most likely token always survives.
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p).unsqueeze(1)
    drop[:, -1] = False
    ascending.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, ascending)


def _exponential_noise(like: torch.Tensor, seeded: list[tuple[int, torch.Generator]]) -> torch.Tensor:
    """Exp(1) noise as -log(U), several times faster on CPU than exponential_. U may be 0, giving an
    infinite E that only makes its token lose; E is never 0, so p / E is never 0 / 0."""
    noise = torch.empty_like(like)
    if len(seeded) < like.shape[0]:
        noise.uniform_()
    for row, generator in seeded:
        noise[row].uniform_(generator=generator)
    return noise.log_().neg_()


class Sampler:
    """Turns one step's logits into tokens (and logprobs when asked), row by row per SamplingBatch.

    `nucleus_window`: how many of each row's top logits are searched for the top-p nucleus before
    falling back to sorting whole rows; real model distributions put 0.95 of their mass well inside it.
    """

    def __init__(self, nucleus_window: int = 1024) -> None:
        if nucleus_window < 1:
            raise ValueError(f"nucleus_window must be at least 1, got {nucleus_window}")
        self.nucleus_window = nucleus_window

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.plain_greedy:
            return SamplerOutput(greedy_tokens(logits), None, None, None, None)
        raw = logits.float()
        x = apply_penalties(raw, batch)
        if batch.banned is not None:
            x = x.index_put(batch.banned, torch.tensor(float("-inf"), device=x.device))
        if batch.greedy is None:
            tokens = self._sample(x, batch)
        elif batch.all_greedy:
            tokens = x.argmax(dim=-1)
        else:
            tokens = torch.where(batch.greedy, x.argmax(dim=-1), self._sample(x, batch))
        if batch.max_logprobs is None:
            return SamplerOutput(tokens, None, None, None, None)
        return self._logprobs(raw, tokens, batch.max_logprobs)

    def _sample(self, x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        x = x / batch.temperature.unsqueeze(1)  # new tensor: the masks below may work in place
        if batch.min_p is not None:
            probs = x.softmax(dim=-1)
            floor = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            x.masked_fill_(probs < floor, float("-inf"))
        if batch.top_k is not None or batch.top_p is not None:
            x = _mask_top_k_top_p(x, batch.top_k, batch.top_p, self.nucleus_window)
        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, and needs no cumsum.
        return probs.div_(_exponential_noise(probs, batch.seeded)).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int) -> SamplerOutput:
        """Logprobs of the raw model distribution, before penalties and temperature (vLLM's default)."""
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(1, tokens.unsqueeze(1))
        ranks = (logprobs > chosen).sum(dim=-1) + 1
        top_ids = top_logprobs = None
        if k > 0:
            top_logprobs, top_ids = logprobs.topk(k, dim=-1)
        return SamplerOutput(tokens, chosen.squeeze(1), ranks, top_ids, top_logprobs)
