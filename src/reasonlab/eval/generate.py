"""Sampling and scoring with HF causal LMs, behind one interface with three backends.

    sampler = make_sampler("auto", model, tok, device=compute.device)   # own | hf | vllm (auto: vllm on CUDA)
    cfg = GenConfig(n=8, temperature=0.7, top_p=0.95, max_new_tokens=128, stop=("\n\nQuestion:",))
    samples = sampler.generate(prompt_ids, cfg, seeds=[...])          # samples[i][j]: j-th sample of prompt i
    sampler.sync(policy)                                              # after an update: sample the new policy
    samples = generate(model, tok, prompts, cfg)                      # the own loop directly (text or token ids)
    lls = loglikelihood(model, tok, [(context, " continuation"), ...])

Backends:
- own (CPU default): our batched decode loop over transformers' DynamicCache. When n samples share one prompt the
  prompt is prefilled ONCE and its cache expanded across the group (batch_repeat_interleave) instead of prefilling n
  copies; finished rows are dropped from the batch and the cache (batch_select_indices) and, grouped, refilled from
  the next prompts (continuous batching: new prompts are prefilled and spliced into the running cache, so a batch
  never drains to its longest row); prompts are prefilled in runs of near-equal length (little padding) after a
  prefix every prompt of the call shares, which is prefilled once; every sample says whether it stopped (EOS or a
  stop string) or was truncated at max_new_tokens. It also decodes from input embeddings (the bridge).
- hf: `model.generate`, one call per prompt group (reference and parity checks).
- vllm (`pip install "reasonlab[vllm]"`, CUDA): reasonlab.eval.vllm_backend, the policy's current weights handed to the
  engine after each update (LoRA merged), as TRL's colocate mode does.
Greedy decoding gives the same tokens on own and hf (tests/test_generate.py).

Sampling is seeded per PROMPT (`seeds`, default: cfg.seed mixed with the prompt's index), so a prompt's samples do not
depend on which other prompts share its batch, on the sorting by length, or on how prompts are spread over processes.
Batches are left-padded (every row's last prompt token sits at the same position) with explicit position ids, so
padding never changes a row's positions. Prompts are sorted by length before batching; results come back in the
caller's order. `min_new_tokens` masks EOS until that many tokens exist (Markovian CoTs of exactly K tokens).
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from reasonlab.errors import UserError
from reasonlab.eval import decode_step
from reasonlab.eval.packed import packed

Backend = Literal["auto", "own", "hf", "vllm"]
BACKENDS = ("auto", "own", "hf", "vllm")


def _cache_kwarg() -> str:
    """transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name warns and goes away
    in 5.40); pass the cache under the name this version reads."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"


CACHE_KW = None  # resolved on first use (importing transformers is slow)


def lm_forward(model, *, cache=None, **kwargs):
    """model(**kwargs) with a transformers Cache object passed under the argument name this transformers reads. The
    cache is updated in place, so callers keep their own reference instead of reading it back from the output."""
    global CACHE_KW
    if cache is not None:
        if CACHE_KW is None:
            CACHE_KW = _cache_kwarg()
        kwargs[CACHE_KW] = cache
        kwargs.setdefault("use_cache", True)
    return model(**kwargs)


def new_cache(model):
    """An empty DynamicCache for `model` (unwrapping DDP / PEFT wrappers to reach the HF config)."""
    from transformers import DynamicCache

    return DynamicCache(config=hf_config(model))


def hf_config(model):
    m = getattr(model, "module", model)  # DistributedDataParallel
    return m.config


@dataclass
class GenConfig:
    n: int = field(default=1, metadata={"help": "samples per prompt"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (argmax); > 0 samples from softmax(z/T)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0 = off)"})
    max_new_tokens: int = field(default=256, metadata={"help": "generation budget per sample"})
    min_new_tokens: int = field(default=0, metadata={"help": "EOS is masked until this many tokens are generated"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "stop strings: the output is cut before the first"})
    batch_size: int = field(default=16, metadata={"help": "rows decoded together (prompts x samples)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (prompt i draws from a generator seeded by seed, i)"})
    grouped: bool = field(default=True, metadata={"help": "prefill each prompt once and share its cache across n"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar"})

    def __post_init__(self):
        if self.n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"n, max_new_tokens and batch_size must be >= 1 (got {self.n}, {self.max_new_tokens}, "
                             f"{self.batch_size})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} must be in [0, max_new_tokens]")
        self.stop = tuple(self.stop)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "progress"}


@dataclass
class Sample:
    text: str  # decoded continuation, cut before the first stop string
    token_ids: list[int]  # generated tokens (EOS excluded; tokens past a stop string kept)
    finish: str  # "eos" | "stop" (a stop string) | "length" (hit max_new_tokens: truncated)

    @property
    def stopped(self) -> bool:
        return self.finish in ("eos", "stop")

    @property
    def truncated(self) -> bool:
        return self.finish == "length"


@dataclass(frozen=True)
class Group:
    """One prompt's own settings in a mixed `generate(..., groups=...)` call: its sample count, temperature and PEFT
    adapter (None: the active one; "__base__": the adapter switched off, i.e. the reference policy). Prompts of
    different groups decode in the same batch, so one pass over the weights serves them all (PEFT's mixed-adapter
    batches: the base layer runs on every row, each adapter on its own rows)."""

    n: int
    temperature: float
    adapter: str | None = None


def finished_sample(tok, ids: list[int], finish: str, stop: tuple[str, ...]) -> Sample:
    """The Sample of generated token ids: decoded, the text cut before the first stop string (finish "stop")."""
    text = tok.decode(ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    return Sample(text, ids, finish)


def prompt_seeds(seed: int, n: int, offset: int = 0) -> list[int]:
    """The default per-prompt seeds: prompt i of a list (at global position offset + i) -> seed + (offset + i) * a large
    odd number (so a one-prompt call with seed s samples exactly as a generator seeded with s)."""
    return [(seed + (offset + i) * 1_000_000_007) % (2**63 - 1) for i in range(n)]


# ----------------------------------------------------------------------------- prompts

def format_prompt(tok, prompt: str, chat: bool, system: str | None = None) -> str:
    """Wrap a task prompt in the tokenizer's chat template (user turn + generation prompt), or return it raw."""
    if not chat:
        return prompt
    if getattr(tok, "chat_template", None) is None:
        raise ValueError("this tokenizer has no chat template: run with --no-chat (raw prompts)")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode(tok, texts: list[str], chat: bool) -> list[list[int]]:
    """Token ids per text. A chat-formatted text already carries its special tokens, so none are added again."""
    return [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def eos_ids(model, tok) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "module", model), "generation_config", None), tok):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else ([e] if e is not None else []))
    return ids


# ----------------------------------------------------------------------------- the own decode loop

def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)  # (B, T), (B, T)


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits (B, V) -> sampling distribution (B, V): softmax(z / T), cut to the top_p nucleus when top_p < 1."""
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)  # (B, V)
        drop = sp.cumsum(-1) - sp > top_p  # mass before this token already exceeds top_p; the top token is always kept
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return probs


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). Greedy at temperature 0; nucleus sampling when top_p < 1."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(next_token_probs(logits, temperature, top_p), 1, generator=gen).squeeze(-1)  # (B,)


def _draw(logits: torch.Tensor, cfg: GenConfig, owner: list[int], gens: list[torch.Generator | None],
          temps: list[float] | None = None) -> torch.Tensor:
    """Next tokens (b,) from logits (b, V): argmax when greedy; else the rows of each prompt (adjacent, owner[r] =
    the prompt of row r) drawn together from that prompt's generator, so its draws do not depend on the other rows.
    `temps`: one temperature per prompt (mixed groups; 0 = that prompt's rows are greedy) instead of cfg's."""
    if temps is None and cfg.temperature == 0:
        return logits.argmax(-1)
    probs = next_token_probs(logits, cfg.temperature, cfg.top_p) if temps is None else None  # (b, V)
    nxt = torch.empty(len(owner), dtype=torch.long, device=logits.device)
    j = 0
    while j < len(owner):
        k = j
        while k < len(owner) and owner[k] == owner[j]:
            k += 1
        t = cfg.temperature if temps is None else temps[owner[j]]
        if t == 0:
            nxt[j:k] = logits[j:k].argmax(-1)
        else:
            p = probs[j:k] if probs is not None else next_token_probs(logits[j:k], t, cfg.top_p)  # (k - j, V)
            nxt[j:k] = torch.multinomial(p, 1, generator=gens[owner[j]]).squeeze(-1)
        j = k
    return nxt


@torch.no_grad()
def _decode_chunk(model, tok, prompts: list[list[int]] | None, expand: int, cfg: GenConfig,
                  gens: list[torch.Generator | None], stop_ids: set[int], embeds: tuple | None = None,
                  past: tuple | None = None):
    """Prefill P prompts once (token ids, or `embeds` = (inputs_embeds (P, T, D), mask (P, T)) left-padded), repeat
    each row's cache `expand` times, decode P*expand rows together; row r draws from gens[r // expand]. Returns
    P*expand Samples, rows of one prompt adjacent."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop_ids), 0)
    cache = new_cache(model) if past is None else past[0]
    if embeds is None:
        ids, mask = _left_pad(prompts, pad, device)  # (P, T)
        inputs = {"input_ids": ids}
    else:
        x, mask = embeds
        inputs = {"inputs_embeds": x}
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, T): real tokens at 0..len-1 whatever the padding
    if past is not None:  # cached positions (B, P0) come first: the new tokens continue after their real ones
        pos = pos + past[1].sum(1, keepdim=True)
        mask = torch.cat([past[1].to(mask.dtype), mask], dim=1)  # (P, P0 + T)
    logits = lm_forward(model, cache=cache, attention_mask=mask, position_ids=pos, logits_to_keep=1,
                        **inputs).logits[:, -1, :]  # (P, V)
    if expand > 1:  # share the prompt's keys/values across its group instead of recomputing them
        cache.batch_repeat_interleave(expand)
        mask = mask.repeat_interleave(expand, dim=0)  # (P*n, T)
        pos = pos.repeat_interleave(expand, dim=0)
        logits = logits.repeat_interleave(expand, dim=0)  # (P*n, V)
    B = mask.shape[0]
    next_pos = pos[:, -1:] + 1  # (B, 1)
    fast = decode_step.for_model(model, cache)  # None: the model's own forward (another cache or architecture)
    generated: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    active = torch.arange(B, device=device)  # row index of each live batch row into `generated`
    eos = sorted(stop_ids)

    for step in range(cfg.max_new_tokens):
        if step < cfg.min_new_tokens and eos:
            logits[:, eos] = float("-inf")  # (b, V): no EOS before min_new_tokens
        nxt = _draw(logits, cfg, (active // expand).tolist(), gens)  # (b,)
        done = torch.zeros_like(nxt, dtype=torch.bool)
        for j, (row, t) in enumerate(zip(active.tolist(), nxt.tolist())):
            if t in stop_ids:
                finish[row], done[j] = "eos", True
                continue
            generated[row].append(t)
            if cfg.stop and any(s in tok.decode(generated[row][-64:], skip_special_tokens=True) for s in cfg.stop):
                finish[row], done[j] = "stop", True
        if step == cfg.max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # drop finished rows from the batch and the cache
            keep = (~done).nonzero().squeeze(-1)  # (b',)
            cache.batch_select_indices(keep)
            active, nxt, mask, next_pos = active[keep], nxt[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (b, T+step+1)
        if fast is not None:
            logits = fast(nxt, cache, mask, next_pos)  # (b, V)
        else:
            logits = lm_forward(model, cache=cache, input_ids=nxt[:, None], attention_mask=mask,
                                position_ids=next_pos).logits[:, -1, :]  # (b, V)
        next_pos = next_pos + 1

    return [finished_sample(tok, generated[row], finish[row], cfg.stop) for row in range(B)]


def _pad_cache_left(cache, k: int) -> None:
    """Prepend k empty (zero, to be masked) positions to every layer of a DynamicCache: (b, H, L, D) -> (b, H, k+L, D)."""
    if k > 0:
        for layer in cache.layers:
            layer.keys = F.pad(layer.keys, (0, 0, k, 0))
            layer.values = F.pad(layer.values, (0, 0, k, 0))


def _splice(cache, mask: torch.Tensor, new, new_mask: torch.Tensor) -> torch.Tensor:
    """Append the rows of the left-padded batch (`new`, new_mask (b2, L2)) to (`cache`, mask (b1, L1)), both aligned on
    their last position: the shorter one is left-padded with masked positions. The cache is changed in place; returns
    the joint mask (b1 + b2, max(L1, L2))."""
    L1, L2 = mask.shape[1], new_mask.shape[1]
    _pad_cache_left(cache, L2 - L1)
    _pad_cache_left(new, L1 - L2)
    for a, b in zip(cache.layers, new.layers):
        a.keys, a.values = torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values])
    return torch.cat([F.pad(mask, (max(0, L2 - L1), 0)), F.pad(new_mask, (max(0, L1 - L2), 0))])  # (b1 + b2, L)


def _trim_left(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading positions no live row attends to (they were padding for rows that have left the batch)."""
    k = int((mask.sum(0) > 0).int().argmax())  # first position some row uses
    if k > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, k:], layer.values[:, :, k:]
        mask = mask[:, k:]
    return mask


def streams(model) -> bool:
    """Whether the continuous-batching loop can splice this model's cache (plain per-layer key/value tensors)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in new_cache(model).layers)


PAD_WASTE = 0.1  # a prefill batch is cut where padding would exceed this share of its tokens


MIN_SHARED_PREFIX = 16  # tokens: a shorter common prefix of a call's prompts is not worth a separate prefill


def _shared_prefix(model, prompts: list[list[int]], device) -> tuple[list, int]:
    """The token prefix every prompt of the call starts with (a few-shot block, a chat template's system turn),
    prefilled ONCE: ([(keys, values) (1, H, P, D) per layer], P), or ([], 0) when it is shorter than
    MIN_SHARED_PREFIX. Every prompt keeps at least one token of its own (its logits come from its own forward)."""
    if len(prompts) < 2:
        return [], 0
    P = min(len(x) for x in prompts) - 1
    first = prompts[0]
    for x in prompts[1:]:
        k = 0
        while k < P and x[k] == first[k]:
            k += 1
        P = k
    if P < MIN_SHARED_PREFIX:
        return [], 0
    c = new_cache(model)
    lm_forward(model, cache=c, input_ids=torch.tensor([first[:P]], device=device), logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in c.layers], P


def _prefill(model, prompts: list[list[int]], ns: list[int], pad: int, device, prefix: tuple[list, int] = ([], 0),
             adapters: list[str] | None = None):
    """Prefill length-sorted prompts in runs of near-equal length (padded prompt tokens cost as much compute as real
    ones; the waste of one run stays under PAD_WASTE), join the runs' caches left-aligned into one batch, and repeat
    prompt i's row ns[i] times (its group shares the prompt's keys/values). `adapters`: the PEFT adapter of each
    prompt (mixed groups), or None (the model as it is). `prefix` = _shared_prefix(...): those
    first P tokens of every prompt are not recomputed; each run starts from their keys/values (the run's left padding
    then sits between the prefix and the rest, masked, with positions continuing after the prefix). Returns (cache,
    mask (sum ns, L), positions of the last prompt token (sum ns, 1), next-token logits (sum ns, V))."""
    kv, P = prefix
    prompts = [x[P:] for x in prompts]
    runs, start = [], 0
    for k in range(1, len(prompts) + 1):
        if k == len(prompts) or (len(prompts[k]) - len(prompts[start])) * (k - start + 1) > \
                PAD_WASTE * sum(len(x) for x in prompts[start:k + 1]):
            runs.append(prompts[start:k])
            start = k
    parts = []  # (cache, mask (r, L_run), last positions (r, 1), logits (r, V)) per run
    done = 0
    for run in runs:
        extra = {} if adapters is None else {"adapter_names": adapters[done:done + len(run)]}
        done += len(run)
        c = new_cache(model)
        ids, m = _left_pad(run, pad, device)  # (r, T)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        if P:  # the shared prefix's keys/values for every row of the run: (1, H, P, D) -> (r, H, P, D)
            for layer, (k, v) in zip(c.layers, kv):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k.expand(len(run), -1, -1, -1), v.expand(len(run), -1, -1, -1)
            pos = pos + P
            m = torch.cat([torch.ones(len(run), P, dtype=m.dtype, device=device), m], dim=1)  # (r, P + T)
        lg = lm_forward(model, cache=c, input_ids=ids, attention_mask=m, position_ids=pos, logits_to_keep=1,
                        **extra).logits[:, -1, :]  # (r, V)
        parts.append((c, m, pos[:, -1:], lg))
    L = max(m.shape[1] for _, m, _, _ in parts)  # the runs joined left-aligned in one copy (not one per run)
    for c, m, _, _ in parts:
        _pad_cache_left(c, L - m.shape[1])
    cache = parts[0][0]
    if len(parts) > 1:
        for i, layer in enumerate(cache.layers):
            layer.keys = torch.cat([c.layers[i].keys for c, _, _, _ in parts])
            layer.values = torch.cat([c.layers[i].values for c, _, _, _ in parts])
    mask = torch.cat([F.pad(m, (L - m.shape[1], 0)) for _, m, _, _ in parts])  # (p, L)
    last, logits = torch.cat([x for _, _, x, _ in parts]), torch.cat([x for _, _, _, x in parts])
    if any(k > 1 for k in ns):  # row i repeated ns[i] times, in order (copies: the values are unchanged)
        idx = torch.repeat_interleave(torch.arange(len(ns), device=device), torch.tensor(ns, device=device))
        cache.batch_select_indices(idx)
        mask, last, logits = mask[idx], last[idx], logits[idx]
    return cache, mask, last, logits


@torch.no_grad()
def _decode_stream(model, tok, prompts: list[list[int]], groups: list[Group], cfg: GenConfig,
                   gens: list[torch.Generator | None], stop_ids: set[int], bar=None) -> list[list[Sample]]:
    """Continuous batching: up to max(cfg.batch_size, largest n) rows decode together; when a quarter of the rows
    (at least one prompt's group) have finished, the next prompts in the list are prefilled (each prefilled once,
    its cache shared by its n rows) and spliced into the running batch, so the batch stays full instead of draining
    to the longest row and no prompt is padded to a longer prompt of a later batch. Row r of prompt i draws from
    gens[i], in the order of its own steps, so a prompt's samples do not depend on which rows run beside it.
    groups[i]: prompt i's n, temperature and adapter (all equal to cfg's unless the caller mixed them). Returns
    samples[i][j]."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(stop_ids), 0)
    eos = sorted(stop_ids)
    ns = [g.n for g in groups]
    temps = [g.temperature for g in groups]
    mixed = any(t != cfg.temperature for t in temps)
    adapters = _adapter_names(model, groups)
    rows_max = max(cfg.batch_size, max(ns))
    refill = max(max(ns), rows_max // 4)  # free rows that trigger a prefill: fewer, larger splices
    queue = list(range(len(prompts)))
    generated = [[[] for _ in range(k)] for k in ns]
    finish = [["length"] * k for k in ns]
    left = list(ns)  # rows of each prompt still decoding
    owner: list[int] = []  # prompt of each live row (a prompt's rows are adjacent)
    sub: list[int] = []  # sample index of each live row
    cache = mask = next_pos = logits = None
    prefix = _shared_prefix(model, prompts, device) if adapters is None or len(set(adapters)) == 1 else ([], 0)
    # mixed adapters other than "the model's active one" and "__base__" go through PEFT's sub-batches
    plain_mix = adapters is None or set(adapters) <= {model.active_adapter, "__base__"}
    step = decode_step.for_model(model, new_cache(model), mixed=adapters is not None) if plain_mix else None

    while queue or owner:
        if queue and (rows_max - len(owner) >= refill or not owner):
            take = []
            while queue and len(owner) + sum(ns[i] for i in take) + ns[queue[0]] <= rows_max:
                take.append(queue.pop(0))
            c, m, last, lg = _prefill(model, [prompts[i] for i in take], [ns[i] for i in take], pad, device, prefix,
                                      None if adapters is None else [adapters[i] for i in take])
            if owner:
                mask = _splice(cache, mask, c, m)
                next_pos, logits = torch.cat([next_pos, last + 1]), torch.cat([logits, lg])
            else:
                cache, mask, next_pos, logits = c, m, last + 1, lg
            owner += [i for i in take for _ in range(ns[i])]
            sub += [j for i in take for j in range(ns[i])]
        counts = [len(generated[i][j]) for i, j in zip(owner, sub)]
        if eos and cfg.min_new_tokens:
            early = torch.tensor([c < cfg.min_new_tokens for c in counts], device=device)  # (b,)
            if bool(early.any()):
                logits[early.nonzero().squeeze(-1)[:, None], torch.tensor(eos, device=device)] = float("-inf")
        nxt = _draw(logits, cfg, owner, gens, temps if mixed else None)  # (b,)
        done = []
        for r, (i, j, t) in enumerate(zip(owner, sub, nxt.tolist())):
            g = generated[i][j]
            if t in stop_ids:
                finish[i][j] = "eos"
            else:
                g.append(t)
                if cfg.stop and any(s in tok.decode(g[-64:], skip_special_tokens=True) for s in cfg.stop):
                    finish[i][j] = "stop"
            if finish[i][j] != "length" or len(g) >= cfg.max_new_tokens:
                done.append(r)
                left[i] -= 1
                if bar is not None and left[i] == 0:
                    bar.update(ns[i])
        if done:
            gone = set(done)
            keep = [r for r in range(len(owner)) if r not in gone]
            owner, sub = [owner[r] for r in keep], [sub[r] for r in keep]
            if not keep:
                cache = mask = next_pos = logits = None
                continue
            kt = torch.tensor(keep, device=device)
            cache.batch_select_indices(kt)
            mask, next_pos, nxt = _trim_left(cache, mask[kt]), next_pos[kt], nxt[kt]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (b, L + 1)
        if step is not None:  # the written-out step: per-row adapter as a 0/1 row scale on the LoRA delta
            rows = None if adapters is None else torch.tensor([float(adapters[i] != "__base__") for i in owner],
                                                                device=device)  # (b,)
            logits = step(nxt, cache, mask, next_pos, rows)  # (b, V)
        else:
            extra = {} if adapters is None else {"adapter_names": [adapters[i] for i in owner]}
            logits = lm_forward(model, cache=cache, input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos,
                                **extra).logits[:, -1, :]  # (b, V)
        next_pos = next_pos + 1

    return [[finished_sample(tok, generated[i][j], finish[i][j], cfg.stop) for j in range(ns[i])]
            for i in range(len(prompts))]


def _adapter_names(model, groups: list[Group]) -> list[str] | None:
    """Per-prompt PEFT adapter names for mixed-adapter batches, or None when every group uses the model as it is."""
    if all(g.adapter is None for g in groups):
        return None
    if not hasattr(model, "active_adapter"):
        raise ValueError("Group.adapter needs a PEFT model (the reference is its adapter switched off)")
    active = model.active_adapter
    return [active if g.adapter is None else g.adapter for g in groups]


def _generators(seeds: list[int], device, greedy: bool) -> list[torch.Generator | None]:
    if greedy:
        return [None] * len(seeds)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def generate(model, tok, prompts: list[str] | list[list[int]], cfg: GenConfig | None = None, *, chat: bool = False,
             seeds: list[int] | None = None, groups: list[Group] | None = None, **overrides) -> list[list[Sample]]:
    """cfg.n samples for each prompt (text, or token ids) with the own decode loop. Returns samples[prompt][sample].
    `seeds`: one per prompt (default prompt_seeds(cfg.seed, len(prompts))). `groups`: one Group per prompt to give
    prompts their own n, temperature and adapter in one batch (the policy's samples and the reference's greedy
    decode of the same questions, in one pass over the weights); cfg's other fields apply to all. CPU linears run
    on oneDNN-packed weights (reasonlab.eval.packed), packed once per model while its weights are unchanged."""
    from tqdm.auto import tqdm

    cfg = cfg or GenConfig(**overrides)
    if not prompts:
        return []
    ids = prompts if isinstance(prompts[0], list) else encode(tok, [format_prompt(tok, p, chat) for p in prompts], chat)
    seeds = prompt_seeds(cfg.seed, len(ids)) if seeds is None else list(seeds)
    if len(seeds) != len(ids):
        raise ValueError(f"{len(seeds)} seeds for {len(ids)} prompts")
    if groups is not None and (len(groups) != len(ids) or not (cfg.grouped and streams(model))):
        raise ValueError(f"groups: need one per prompt ({len(groups)} for {len(ids)}) and the continuous-batching "
                         "loop (cfg.grouped, a DynamicCache model)")
    stop_ids = eos_ids(model, tok)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    results: list[list[Sample] | None] = [None] * len(ids)
    packing = contextlib.ExitStack()
    total = len(ids) * cfg.n if groups is None else sum(g.n for g in groups)
    bar = tqdm(total=total, disable=not cfg.progress, desc="generate", unit="sample", leave=False)
    greedy = cfg.temperature == 0
    try:
        packing.enter_context(packed(model))
        if cfg.grouped and streams(model):
            gs = [Group(cfg.n, cfg.temperature)] * len(ids) if groups is None else [groups[i] for i in order]
            gens = [_generators([seeds[i]], device, g.temperature == 0)[0] for i, g in zip(order, gs)]
            out = _decode_stream(model, tok, [ids[i] for i in order], gs, cfg, gens, stop_ids, bar)
            for i, group in zip(order, out):
                results[i] = group
        elif cfg.grouped:  # a cache the stream cannot splice: static batches of whole groups
            per = max(1, cfg.batch_size // cfg.n)  # prompts per chunk; one prompt's group is never split
            for c in range(0, len(order), per):
                chunk = order[c:c + per]
                out = _decode_chunk(model, tok, [ids[i] for i in chunk], cfg.n, cfg,
                                    _generators([seeds[i] for i in chunk], device, greedy), stop_ids)
                for k, i in enumerate(chunk):
                    results[i] = out[k * cfg.n:(k + 1) * cfg.n]
                bar.update(len(chunk) * cfg.n)
        else:  # the plain way: every sample is its own row with its own copy of the prompt
            rows = [(i, j) for i in order for j in range(cfg.n)]
            for i in order:
                results[i] = []
            gens = dict(zip(order, _generators([seeds[i] for i in order], device, greedy)))
            for c in range(0, len(rows), cfg.batch_size):
                chunk = rows[c:c + cfg.batch_size]
                # rows of one prompt are adjacent here too; each row carries its prompt's generator
                out = _decode_chunk(model, tok, [ids[i] for i, _ in chunk], 1, cfg, [gens[i] for i, _ in chunk],
                                    stop_ids)
                for (i, _), s in zip(chunk, out):
                    results[i].append(s)
                bar.update(len(chunk))
    finally:
        packing.close()
        bar.close()
        model.train(was_training)
    return results  # type: ignore[return-value]


@torch.no_grad()
def generate_from_embeds(model, tok, embeds: torch.Tensor, attn: torch.Tensor, cfg: GenConfig,
                         past: tuple | None = None) -> list[Sample]:
    """One greedy (or seeded) sample per row from left-padded input embeddings (B, T, D) with mask (B, T): the own
    loop prefilled from embeddings instead of token ids (the bridge's soft prompts). Equals generation from the same
    tokens' ids (tests/test_bridge.py). `past` = (cache, mask (B, P)): positions already in a cache that come before
    the embeddings (a shared prefix, or the bridge's fused prompt); the cache is consumed."""
    if cfg.n != 1:
        raise ValueError("generate_from_embeds draws one sample per row")
    seeds = prompt_seeds(cfg.seed, embeds.shape[0])
    was_training = model.training
    model.eval()
    try:
        return _decode_chunk(model, tok, None, 1, cfg, _generators(seeds, embeds.device, cfg.temperature == 0),
                             eos_ids(model, tok), embeds=(embeds, attn), past=past)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- backends behind one interface

class OwnSampler:
    """The own decode loop (reasonlab's default; the only backend that decodes from input embeddings)."""

    name = "own"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def generate(self, prompts: list[list[int]], cfg: GenConfig, seeds: list[int] | None = None,
                 groups: list[Group] | None = None) -> list[list[Sample]]:
        return generate(self.model, self.tok, prompts, cfg, seeds=seeds, groups=groups)

    def sync(self, model=None) -> None:
        """Nothing to hand over: the loop samples the live model."""


class HFSampler:
    """`model.generate`, one call per prompt group (its seed set before the call): for parity checks and models whose
    forward the own loop does not support."""

    name = "hf"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: GenConfig, seeds: list[int] | None = None) -> list[list[Sample]]:
        model, tok = self.model, self.tok
        seeds = prompt_seeds(cfg.seed, len(prompts)) if seeds is None else list(seeds)
        stop_ids = eos_ids(model, tok)
        device = next(model.parameters()).device
        greedy = cfg.temperature == 0  # one greedy sequence stands for all n (HF refuses n > 1 without sampling)
        kw = dict(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens or None,
                  do_sample=not greedy, num_return_sequences=1 if greedy else cfg.n, eos_token_id=sorted(stop_ids),
                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else min(stop_ids))
        if cfg.temperature > 0:
            kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        if cfg.stop:
            kw.update(stop_strings=list(cfg.stop), tokenizer=tok)
        was_training = model.training
        model.eval()
        out: list[list[Sample]] = []
        try:
            for p, seed in zip(prompts, seeds):
                ids = torch.tensor([p], device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(int(seed))
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)  # (n, T + new)
                group = [_hf_sample(tok, row[len(p):].tolist(), stop_ids, cfg) for row in gen]
                out.append([Sample(g.text, list(g.token_ids), g.finish) for g in group * cfg.n] if greedy else group)
        finally:
            model.train(was_training)
        return out

    def sync(self, model=None) -> None:
        """Nothing to hand over: generate() runs the live model."""


def _hf_sample(tok, new: list[int], stop_ids: set[int], cfg: GenConfig) -> Sample:
    finish = "length"
    for k, t in enumerate(new):
        if t in stop_ids:  # HF pads after EOS with the pad id (often EOS itself)
            new, finish = new[:k], "eos"
            break
    return finished_sample(tok, new, finish, cfg.stop)


class BackendUnavailable(UserError, RuntimeError):
    """A requested generation backend cannot run here (one line names the fix)."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, device) -> str:
    """auto -> vllm on CUDA when vLLM is installed, else own. A missing vLLM on request is one line naming the extra."""
    if backend not in BACKENDS:
        raise ValueError(f"generation backend must be one of {list(BACKENDS)}, got {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "vllm" if on_cuda and vllm_installed() else "own"
    if backend == "vllm":
        if not vllm_installed():
            raise BackendUnavailable('rollout backend vllm needs vLLM: pip install "reasonlab[vllm]" (CUDA machines), '
                                     "or set the backend to own")
        if not on_cuda:
            raise BackendUnavailable("rollout backend vllm needs a CUDA device (train.device); on CPU use own or hf")
    return backend


def make_sampler(backend: str, model, tok, *, device="cpu", vllm: dict | None = None):
    """The sampler for a resolved or 'auto' backend. `vllm`: engine settings for the vLLM backend (model path, dtype,
    gpu_memory_utilization, max_model_len, seed)."""
    name = resolve_backend(backend, device)
    if name == "own":
        return OwnSampler(model, tok)
    if name == "hf":
        return HFSampler(model, tok)
    from reasonlab.eval.vllm_backend import VLLMSampler

    return VLLMSampler(model, tok, **(vllm or {}))


# ----------------------------------------------------------------------------- log-likelihood scoring

def _split_request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding: trailing spaces of the context move to the continuation; the continuation's tokens are
    those of tok(context + continuation) after the context's tokens (so merges across the boundary are respected)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:  # empty context: condition on a BOS/EOS token, as lm-eval does
        ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    return ctx, cont


@torch.no_grad()
def loglikelihood(model, tok, requests: list[tuple[str, str]], batch_size: int = 8,
                  progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of log p(continuation tokens | context), whether every continuation
    token is the argmax). Left-padded batches; only the continuation positions' logits are materialized."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = [_split_request(tok, c, x) for c, x in requests]
    results: list[tuple[float, bool]] = [(0.0, True)] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        for c in tqdm(range(0, len(order), batch_size), disable=not progress, desc="loglik", leave=False):
            chunk = order[c:c + batch_size]
            rows = [(encoded[i][0] + encoded[i][1])[:-1] for i in chunk]  # inputs: predict token t+1 from <= t
            ids, mask = _left_pad(rows, pad, device)  # (B, T)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = max(len(encoded[i][1]) for i in chunk)  # continuations end at the last position (left padding)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            logp = F.log_softmax(logits.float(), dim=-1)  # (B, keep, V)
            for b, i in enumerate(chunk):
                cont = encoded[i][1]
                lp = logp[b, keep - len(cont):, :]  # (len(cont), V)
                target = torch.tensor(cont, device=device)
                ll = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (ll, greedy)
    finally:
        model.train(was_training)
    return results


def choice_predictions(logliks: list[float], choices: list[str]) -> tuple[int, int]:
    """(acc prediction, acc_norm prediction) exactly as lm-eval's multiple_choice: argmax of the summed log-likelihood,
    and argmax of log-likelihood / len(choice) — lm-eval's code divides by the choice string's length in characters
    (its docs say bytes; identical for ASCII)."""
    lls = torch.tensor(logliks, dtype=torch.float64)
    lens = torch.tensor([float(len(c)) for c in choices], dtype=torch.float64)
    return int(lls.argmax()), int((lls / lens).argmax())
