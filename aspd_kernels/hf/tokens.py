"""Adding ASPD's six special tokens to a tokenizer and growing the model's embeddings to match."""
from __future__ import annotations

from ..tokens import TOKEN_STRINGS, AspdTokens


def add_aspd_tokens(tokenizer, model=None, *, mean_resizing: bool = True,
                    pad_to_multiple_of: int | None = None) -> AspdTokens:
    """Add ``<|branch|> <|/branch|> <|title|> <|/title|> <|para|> <|/para|>`` as special tokens (never split, not
    normalised) unless the tokenizer has them, and resize ``model``'s input and output embeddings when the vocabulary
    outgrows them. Returns their ids.

    Embeddings only grow: Qwen2.5 checkpoints already reserve rows past the tokenizer's vocabulary, so the tokens
    land on ASPD's ids 151665..151670 without a resize. ``mean_resizing`` initialises new rows around the mean of
    the old ones (transformers' default), which keeps the first losses of a fine-tune sane.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in TOKEN_STRINGS if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokens = AspdTokens.from_tokenizer(tokenizer)
    if model is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of,
                                          mean_resizing=mean_resizing)
    return tokens
