"""A tiny Gemma-3-like tokenizer for the processor tests: the same `tokenizers` object as our Tokenizer and as a
transformers fast tokenizer with Gemma 3's image tokens (what Gemma3Processor reads off its tokenizer).

Ids fit the tiny model of test_hf_gemma3 (vocab 64): <image_soft_token> 60, <start_of_image> 61, <end_of_image> 62.
"\\n\\n" is a token of its own (Gemma 3's image framing), other whitespace separates words.
"""

IMAGE, BOI, EOI = 60, 61, 62
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
WORDS = SPECIAL + ["\n\n", "Here", "is", "the", "original", "image", "and", "here", "are", "some", "crops", "to",
                   "help", "you", "see", "better", "user", "model", "what", "this", "a", "cat", "and", "dog"]


def make_tokenizers(directory):
    """(our Tokenizer, transformers.PreTrainedTokenizerFast) over one tokenizer.json written to ``directory``."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from mllm_jax.data.processor import load_tokenizer

    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    vocab.update({"<image_soft_token>": IMAGE, "<start_of_image>": BOI, "<end_of_image>": EOI})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL + ["<image_soft_token>", "<start_of_image>", "<end_of_image>"])
    tok.add_tokens([AddedToken("\n\n", normalized=False)])
    tok.save(str(directory / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"})
    return load_tokenizer(str(directory)), hf
