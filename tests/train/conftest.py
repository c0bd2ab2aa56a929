"""Tiny models saved as Hugging Face directories, so training runs through the same loading path as real ones.

tiny BERT: hidden 32, 2 layers, no dropout, the real MiniLM tokenizer (vocab 30,522).
tiny GPT-2: hidden 32, 2 layers, a byte-level BPE tokenizer trained here on E2E lines (no download).
tiny Llama: hidden 32, 2 layers, 4 heads sharing 2 key/value heads (as SmolLM2's grouped-query attention), tied
embeddings, the same BPE tokenizer.
Both use initializer_range 0.2 (see BERT below).
"""

import pytest
import torch

from lorakit.train.data import bundled_data_dir
from tests.conftest import minilm_path

BERT = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 128, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.2}
# initializer_range 0.2 (not 0.02): a random model's features then differ between sentences enough for a
# linear probe or BitFit to fit a small batch in a few steps.


def save_tiny_bert(path) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**BERT)).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return str(path)


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (bundled_data_dir("e2e") / "valid.txt").read_text(encoding="utf-8").splitlines()[:600]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>",
                                   model_input_names=["input_ids", "attention_mask"])


def save_tiny_llama(path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                         tie_word_embeddings=True, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = bpe_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128, initializer_range=0.2,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
