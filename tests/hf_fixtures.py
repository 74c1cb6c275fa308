"""Tiny Hugging Face model directories built locally (nothing is downloaded): a byte-level BPE
tokenizer trained with ``tokenizers`` on a corpus, saved with ``save_pretrained`` beside a
randomly initialized (perturbed) ``LlamaForCausalLM`` of the ``llama-tiny`` shape."""
from __future__ import annotations

import json
from pathlib import Path

# Llama's convention: <unk>=0, <s>=1 (put in front of a text), </s>=2 (end of a document).
SPECIALS = ["<unk>", "<s>", "</s>"]


def corpus_texts(corpus: Path, split: str = "train") -> list[str]:
    return [json.loads(line)["text"] for d in sorted(corpus.iterdir()) if d.is_dir()
            for line in (d / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]


def save_tokenizer(out: Path, texts: list[str], vocab_size: int = 384) -> Path:
    """A byte-level BPE (every text encodes without <unk>) that adds <s> in front of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(out)
    return out


def save_llama(out: Path, vocab_rows: int, seed: int = 2, **overrides) -> Path:
    """A ``llama-tiny``-shaped LlamaForCausalLM with random, perturbed weights."""
    import torch
    import transformers

    shape = dict(vocab_size=vocab_rows, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=3000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 bos_token_id=1, eos_token_id=2) | overrides
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(out)
    return out


def save_model_dir(out: Path, corpus: Path, vocab_size: int = 384, vocab_rows: int = 400) -> Path:
    """One directory as a user downloads it: config.json, model.safetensors and the tokenizer
    (embedding rows beyond the tokenizer's ids, as real models pad theirs)."""
    save_tokenizer(out, corpus_texts(corpus), vocab_size)
    return save_llama(out, vocab_rows)


# GPT-2's convention: one special token, <|endoftext|>, after the vocabulary; it is bos, eos and
# unk at once, there is no pad token, and nothing is put in front of a text.
ENDOFTEXT = "<|endoftext|>"


def save_gpt2_tokenizer(out: Path, texts: list[str], vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([ENDOFTEXT])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                            unk_token=ENDOFTEXT).save_pretrained(out)
    return out


def save_gpt2_model_dir(out: Path, corpus: Path, seed: int = 3) -> Path:
    """A GPT-2-family directory as a user downloads it: the tokenizer above and a ``tiny``-shaped
    GPT2LMHeadModel (random, perturbed weights) whose embedding has exactly its ids."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    save_gpt2_tokenizer(out, corpus_texts(corpus))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eot = tok.token_to_id(ENDOFTEXT)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=64, n_layer=2, n_head=2,
        n_inner=256, bos_token_id=eot, eos_token_id=eot))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(out)
    return out
