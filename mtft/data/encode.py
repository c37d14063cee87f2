"""Conversations to token ids and labels: the learned tokens per `train_on`, cut to `max_length`.

Each piece of a rendered conversation (mtft/data/templates.py) is tokenized on its own, so a learned
span starts exactly where the model's prompt ends, as at inference. Without a chat template the
tokenizer's bos/eos tokens frame the text; a template writes its own.

A piece too long to be kept whole (one huge record) is not tokenized whole: `_cut` keeps at most
`max_length` tokens from its start or its end, so only a window of characters at each end is
tokenized, grown until it holds `MARGIN` tokens more than that. The window's edge is put on a space
after a word, where whitespace-splitting tokenizers (byte-level BPE as in GPT-2, Llama 3 and Qwen;
SentencePiece) split too, so its words tokenize as in the whole text; a tokenizer that rewrites the
start of every text (Llama 2's prepended "▁") changes only the first word of a tail window, inside the
margin. Inside one word longer than the half window searched for that space, the cut word may be
tokenized differently: BPE is not stable under cutting a word (it merges a run of one character from
its left end, so where the run's last tokens fall depends on the run's whole length). There the same
number of tokens is kept, so the row's length and learned mask are the whole tokenization's, and they
are the tokenization of a contiguous span of the piece's text.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtft.data.collator import IGNORE_INDEX
from mtft.data.config import TrainOn
from mtft.data.formats import TEXT, RecordError
from mtft.data.templates import Piece, chat_pieces, plain_pieces

# Tokens a window of an over-long piece holds beyond the kept ones, on the side where it was cut.
MARGIN = 128
CHARS_PER_TOKEN = 4  # a window's first size, per token needed; doubled until it holds enough


@dataclass
class Encoder:
    tokenizer: object
    max_length: int
    template: str | None  # None: plain prompt + response (bos/eos added here)

    def pieces(self, roles: list[str], contents: list[str]) -> list[Piece]:
        if self.template is None or roles == [TEXT]:
            return plain_pieces(roles, contents)
        return chat_pieces(self.tokenizer, self.template, roles, contents)

    def prompt(self, roles: list[str], contents: list[str]) -> tuple[list[int], str]:
        """What the model is given before the conversation's last answer, tokenized exactly as in
        training (piece by piece, bos first where training framed the text), and the text that ends
        that answer (the template's end-of-turn marker, or the eos token): where generation stops."""
        pieces = self.pieces(roles, contents)
        ids = [
            t for text, _ in pieces[:-1] for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ]
        tok = self.tokenizer
        if self.template is None:
            return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids, tok.eos_token
        answer, turn = contents[-1], pieces[-1][0]
        at = turn.rfind(answer) if answer else 0
        return ids, turn[at + len(answer) :] if at >= 0 else ""

    def encode_batch(
        self, conversations: list[tuple[list[str], list[str]]], train_on: TrainOn
    ) -> list[tuple[list[int], list[int], bool]]:
        """(input_ids, labels, truncated) per conversation; a RecordError names what is wrong with one
        (its `row` is the index in `conversations`)."""
        all_pieces = []
        for i, (roles, contents) in enumerate(conversations):
            try:
                all_pieces.append((self.pieces(roles, contents), roles == [TEXT]))
            except ValueError as e:
                raise RecordError(i, str(e)) from None
        texts = [text for pieces, _ in all_pieces for text, _ in pieces]
        ends = [self._ends(text) for text in texts]
        whole = [text for text, end in zip(texts, ends, strict=True) if end is None]
        ids = iter(self.tokenizer(whole, add_special_tokens=False)["input_ids"] if whole else ())
        tokens_of = iter([next(ids) if end is None else end for end in ends])
        out = []
        for pieces, is_text in all_pieces:
            tokens = [next(tokens_of) for _ in pieces]
            turns = [is_turn for _, is_turn in pieces]
            framed = self.template is None or is_text
            out.append(self._assemble(tokens, turns, TrainOn.all if is_text else train_on, framed))
        return out

    def _ends(self, text: str) -> list[int] | None:
        """A stand-in for the tokens of a text too long to be kept whole: its first and its last
        `max_length` tokens, from a window at each end (None for a text to tokenize whole). It is longer
        than `max_length`, as the text's tokens are, and `_cut` reads no other tokens of such a piece."""
        head = self._window(text, at_end=False)
        tail = self._window(text, at_end=True) if head else None
        return head[: self.max_length] + tail[-self.max_length :] if head and tail else None

    def _window(self, text: str, at_end: bool) -> list[int] | None:
        """The tokens of a window of `text` at its start (or end) holding `max_length + MARGIN` tokens,
        in at most half of the text (so the two windows never overlap); None if no such window."""
        need = self.max_length + MARGIN
        size = need * CHARS_PER_TOKEN
        while 2 * size <= len(text):
            lo = len(text) - size if at_end else size // 2
            edge = _word_end(text, lo, lo + size // 2)
            if edge is None:
                edge = lo if at_end else size
            window = text[edge:] if at_end else text[:edge]
            ids = self.tokenizer(window, add_special_tokens=False)["input_ids"]
            if len(ids) >= need:
                return ids
            size *= 2
        return None

    def _assemble(
        self, tokens: list[list[int]], turns: list[bool], train_on: TrainOn, framed: bool
    ) -> tuple[list[int], list[int], bool]:
        """`framed`: the tokenizer's bos and eos tokens go around the text (no template writes them)."""
        tok = self.tokenizer
        bos: list[int] = []
        if framed:
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            tokens = [*tokens[:-1], tokens[-1] + [tok.eos_token_id]]
        tokens = [bos + tokens[0], *tokens[1:]]
        truncated = sum(map(len, tokens)) > self.max_length
        if truncated:
            tokens, turns = self._cut(tokens, turns, len(bos))
        last = max(i for i, t in enumerate(turns) if t)
        input_ids, labels = [], []
        for i, (piece, is_turn) in enumerate(zip(tokens, turns, strict=True)):
            learned = train_on == TrainOn.all or is_turn and (train_on == TrainOn.all_assistant or i == last)
            input_ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        return input_ids, labels, truncated

    def _cut(
        self, tokens: list[list[int]], turns: list[bool], n_bos: int
    ) -> tuple[list[list[int]], list[bool]]:
        """Whole turns from the start while they fit; if not even the first answer fits, the end of its
        prompt and the start of the answer (the part nearest the boundary matters most). Of a piece
        longer than `max_length` it reads only that it is longer, and at most `max_length` tokens at
        either end: all that `_ends` keeps of a huge one."""
        total, keep = 0, 0
        for i, piece in enumerate(tokens):
            total += len(piece)
            if total > self.max_length:
                break
            if turns[i]:
                keep = i + 1
        if keep:
            return tokens[:keep], turns[:keep]
        first = turns.index(True)
        bos = tokens[0][:n_bos]
        p = [t for piece in tokens[:first] for t in piece][n_bos:] if first else []
        r = tokens[first][n_bos:] if first == 0 else tokens[first]
        budget = max(self.max_length - len(r), self.max_length // 2) - n_bos
        p = p[-budget:] if budget > 0 else []
        r = r[: self.max_length - n_bos - len(p)]
        return ([bos + p, r], [False, True]) if first or p else ([bos + r], [True])


def _word_end(text: str, lo: int, hi: int) -> int | None:
    """The last space in text[lo:hi] that follows a non-space character: the end of a word, where a
    window of the text can be cut without changing how the words before (or after) it tokenize."""
    at = text.rfind(" ", max(lo, 1), hi)
    while at > 0 and text[at - 1].isspace():
        at = text.rfind(" ", max(lo, 1), at)
    return at if at > 0 else None
