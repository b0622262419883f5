"""Next-token choice: repetition controls on the logits (a penalty on tokens already seen, a ban
on repeated n-grams), then greedy, or temperature / top-k / top-p sampling from a seeded
generator, in the order of transformers' generate."""

from dataclasses import dataclass

import torch

from facli.units import check_count, check_number

SEED_LIMIT = 1 << 64  # torch.Generator.manual_seed takes 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation; repetition_penalty 1
    and no_repeat_ngram_size 0 mean no repetition control."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        check_number(self.temperature, "--temperature", low=0, note=" (0 is greedy)")
        check_number(self.top_p, "--top-p", low=0, high=1, low_open=True)
        check_count(self.top_k, "--top-k", low=0)
        check_count(self.seed, "--seed", low=0, high=SEED_LIMIT - 1)
        check_number(self.repetition_penalty, "--repetition-penalty", low=0, low_open=True,
                     note=" (1 is off)")
        check_count(self.no_repeat_ngram_size, "--no-repeat-ngram-size", low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32, after TokenHistory.apply -> token ids [B] int64."""
        if self.params.greedy:
            return logits.argmax(dim=-1)
        probs = self.probabilities(logits)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] -> [B, V] the distribution sampled from: temperature, then top-k, then
        top-p, the order of transformers' warpers in generate."""
        # Shifted so the largest is 0 before scaling: a tiny temperature then sends the others
        # to -inf, never the largest to inf (whose softmax would be nan).
        top = logits.max(dim=-1, keepdim=True).values
        # A row whose every token is banned (no_repeat_ngram_size over a small vocabulary) puts
        # all its mass on token 0, which greedy decoding (argmax) takes there, instead of nan.
        banned = torch.isneginf(top)
        logits = torch.where(banned, 0.0, logits - top) / self.params.temperature
        if self.params.top_k:
            kth = torch.topk(logits, min(self.params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.params.top_p < 1:
            logits = _top_p_filter(logits, self.params.top_p)
        probs = torch.softmax(logits, dim=-1)
        first = torch.zeros_like(probs[:1])
        first[:, 0] = 1.0
        return torch.where(banned, first, probs)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class TokenHistory:
    """Each row's tokens so far (its prompt included), as SamplingParams' repetition controls
    read them, with transformers' semantics:

    - repetition_penalty (RepetitionPenaltyLogitsProcessor): the logit of every token already in
      the row is divided by the penalty where positive and multiplied by it where negative. Kept
      as a [rows, V] device tensor of seen-token flags, set as tokens arrive.
    - no_repeat_ngram_size n (NoRepeatNGramLogitsProcessor): a token that would complete an
      n-gram already in the row gets -inf. Kept on the host as a table from each (n-1)-token
      prefix to the tokens that followed it, plus the row's last n-1 tokens.

    A step costs a few elementwise ops on the device for the penalty and one index_put of the
    banned tokens; rows are addressed by a slice, so a batch's rows each keep their own history.
    With both controls off every method returns at once."""

    def __init__(self, params: SamplingParams, rows: int, vocab_size: int, device: torch.device):
        self.penalty, self.ngram = params.repetition_penalty, params.no_repeat_ngram_size
        self.vocab_size, self.device = vocab_size, device
        self.seen = (torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
                     if self.penalty != 1 else None)
        self.tables: list[dict | None] = [None] * rows
        self.tails: list[list[int]] = [[] for _ in range(rows)]

    def start(self, row: int, prompt_ids: list[int]) -> None:
        """Row `row` begins a new sequence with these prompt tokens."""
        if self.seen is not None:
            self.seen[row] = False
            # Ids past the logits' vocabulary (a tokenizer larger than the LM head) can never be
            # generated; transformers drops them the same way.
            ids = torch.tensor(prompt_ids, dtype=torch.long).clamp_(max=self.vocab_size)
            flags = torch.zeros(self.vocab_size + 1, dtype=torch.bool).index_fill_(0, ids, True)
            self.seen[row] = flags[:-1].to(self.device)
        if self.ngram:
            n, table = self.ngram, {}
            for gram in zip(*(prompt_ids[i:] for i in range(n))):
                table.setdefault(gram[:-1], set()).add(gram[-1])
            self.tables[row] = table
            self.tails[row] = list(prompt_ids[len(prompt_ids) - n + 1:]) if n > 1 else []

    def stop(self, row: int) -> None:
        """Row `row` is free: its n-gram table is dropped until the next start."""
        self.tables[row], self.tails[row] = None, []

    def push(self, tokens: torch.Tensor, rows: slice = slice(None)) -> None:
        """tokens [R] (device): the token each row of `rows` just took."""
        if self.seen is not None:
            self.seen[rows].scatter_(1, tokens[:, None], True)
        if not self.ngram:
            return
        n = self.ngram
        for row, token in zip(range(len(self.tables))[rows], tokens.tolist()):
            table, tail = self.tables[row], self.tails[row]
            if table is None:
                continue
            if len(tail) == n - 1:
                table.setdefault(tuple(tail), set()).add(token)
            if n > 1:
                tail.append(token)
                del tail[:-(n - 1)]

    def apply(self, logits: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """logits [R, V] of the rows `rows` -> the logits with the penalty and the bans applied
        (a new tensor: the input may be a CUDA graph's output buffer)."""
        if self.seen is not None:
            penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen[rows], penalized, logits)
        if self.ngram:
            banned_rows, banned_tokens = [], []
            for index, row in enumerate(range(len(self.tables))[rows]):
                table, tail = self.tables[row], self.tails[row]
                if table is None or len(tail) != self.ngram - 1:
                    continue
                banned = [token for token in table.get(tuple(tail), ()) if token < self.vocab_size]
                banned_rows += [index] * len(banned)
                banned_tokens += banned
            if banned_tokens:
                where = torch.tensor([banned_rows, banned_tokens], dtype=torch.long).to(self.device)
                logits = logits.index_put(tuple(where), logits.new_tensor(float("-inf")))
        return logits
