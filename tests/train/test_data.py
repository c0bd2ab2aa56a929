"""The data layer on the real bundled files, every DataError on tiny files, and tokenization/batching
checked against independent computations (per-word tokenization, hand-written expectations)."""

import hashlib
import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.train.data import (
    IGNORE_INDEX,
    LM_SEPARATOR,
    DataError,
    LMExample,
    TextExample,
    TokenExample,
    bundled_data_dir,
    collate,
    encode,
    load_task,
    make_batches,
    pad_token_id,
)

# sha256 from each folder's SOURCE.md: the vendored copies must be byte-identical to the sources.
SHA256 = {
    "sst2/stsa.binary.train": "71c04bcc41291fa47454dd670df701b14ee9249156babeaac404cfe2c8d74338",
    "sst2/stsa.binary.dev": "02fedc82855dbdcabe82c65ed1af6c6570788eaac51073cdb35ee8c7784426d1",
    "rte/train.tsv": "41e3a9b063433392343fad9e962cf2f58b681c78d8f71592f4186f0837246c5c",
    "rte/dev.tsv": "80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb",
    "wnut17/wnut17train.conll": "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
    "wnut17/emerging.dev.conll": "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
    "e2e/valid.txt": "ba963113c8401d3d26216c0dc0a6dae1ea6ea927de3bf830e32c41f65401c80d",
    "e2e/test.txt": "81b1bcd40c4f12845ec4eb61a77bf43765d112483cd9b2f91ef10bfc1b3d8f13",
}


@pytest.mark.parametrize("rel", sorted(SHA256))
def test_vendored_files_are_byte_identical(rel):
    task, name = rel.split("/")
    path = bundled_data_dir(task) / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256[rel]
    assert (path.parent / "SOURCE.md").is_file()


# ------------------------------------------------------------------------- real files (counts: SOURCE.md)


def test_sst2_counts_and_labels():
    d = load_task("sst2", None)
    assert (d.kind, d.labels, len(d.train), len(d.dev)) == ("classification", ["0", "1"], 6920, 872)
    assert Counter(ex.label for ex in d.train) == {"1": 3610, "0": 3310}
    assert Counter(ex.label for ex in d.dev) == {"1": 444, "0": 428}
    assert d.train[0].text.startswith("a stirring , funny") and d.train[0].text_pair is None


def test_rte_counts_and_quote_starting_fields():
    d = load_task("rte", None)
    assert (d.kind, d.labels, len(d.train), len(d.dev)) == (
        "classification", ["entailment", "not_entailment"], 2490, 277)
    assert Counter(ex.label for ex in d.train) == {"entailment": 1249, "not_entailment": 1241}
    assert Counter(ex.label for ex in d.dev) == {"entailment": 146, "not_entailment": 131}
    # SOURCE.md: 72 train fields begin with '"'; default csv quoting would swallow rows.
    assert sum(f.startswith('"') for ex in d.train for f in (ex.text, ex.text_pair)) == 72
    assert d.train[2164].text.startswith('"That film wasn\'t too successful')
    # an independent parse: a plain split on tabs
    lines = (bundled_data_dir("rte") / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    assert [(ex.text, ex.text_pair, ex.label) for ex in d.train] == [(a, b, c) for _, a, b, c in rows]


def test_wnut17_counts_and_bio_labels():
    d = load_task("wnut17", None)
    assert (d.kind, len(d.train), len(d.dev)) == ("token_classification", 3394, 1009)
    assert sum(len(ex.tokens) for ex in d.train) == 62730 and sum(len(ex.tokens) for ex in d.dev) == 15733
    types = ["corporation", "creative-work", "group", "location", "person", "product"]
    assert d.labels == ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    tags = Counter(t for ex in d.train for t in ex.tags)
    counts = (tags["B-person"], tags["I-person"], tags["B-creative-work"], tags["I-creative-work"])
    assert counts == (660, 335, 140, 206)
    assert all(len(ex.tokens) == len(ex.tags) for ex in d.train + d.dev)
    assert d.train[0].tokens[14:17] == ["Empire", "State", "Building"]


def test_e2e_trains_on_valid_minus_a_dev_split_of_its_mrs():
    d = load_task("e2e", None)
    assert (d.kind, d.labels, len(d.train) + len(d.dev)) == ("causal_lm", [], 4672)
    assert len({ex.prompt for ex in d.train}) == 547 - 55 and len({ex.prompt for ex in d.dev}) == 55
    first = d.train[0]
    assert first.prompt == "name : Alimentum | area : city centre | family friendly : no"
    assert first.completion == "There is a place in the city centre , Alimentum , that is not family - friendly ."


def test_generic_task_names_find_the_same_files():
    assert load_task("ner", bundled_data_dir("wnut17")).train == load_task("wnut17", None).train
    e2e, generic = load_task("e2e", None), load_task("causal-lm", bundled_data_dir("e2e"))
    assert sorted(e2e.train + e2e.dev, key=lambda ex: ex.line) == generic.train


def test_glue_tsv_strips_fields_and_jsonl_reads(tmp_path):
    (tmp_path / "train.tsv").write_text("\ufeffsentence\tlabel\r\nit 's good \t1\r\nbad \t0\n\n")  # BOM, CRLF
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine \t1\n")
    d = load_task("classification", tmp_path)
    assert d.train == [TextExample("it 's good", None, "1"), TextExample("bad", None, "0")]
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n\n")
    (tmp_path / "dev.jsonl").write_text(json.dumps({"prompt": "q", "completion": "d", "extra": 1}) + "\n")
    d = load_task("causal-lm", tmp_path)
    assert (d.train, d.dev) == ([LMExample("p", "c")], [LMExample("q", "d")])


def test_numeric_labels_sort_numerically(tmp_path):
    (tmp_path / "a.train").write_text("10 x\n2 y\n1 z\n")
    (tmp_path / "a.dev").write_text("2 w\n")
    assert load_task("classification", tmp_path).labels == ["1", "2", "10"]


# ------------------------------------------------------------------------------------------ DataError


def _write(tmp_path, files: dict) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")


TSV_OK = "sentence\tlabel\ngood\t1\nbad\t0\n"
CASES = {  # name: (task, files, substrings the message must hold)
    "no files": ("classification", {"notes.md": "x"}, ["train.tsv + dev.tsv", "*.train + *.dev", "notes.md"]),
    "no dev": ("classification", {"train.tsv": TSV_OK}, ["dev.tsv", "dev split", "no file"]),
    "two train files": ("classification", {"a.train": "1 x\n", "b.train": "1 y\n", "a.dev": "1 z\n"},
                        ["a.train, b.train", "'*.train'"]),
    "no label column": ("classification", {"train.tsv": "sentence\tlbl\nx\t1\n", "dev.tsv": TSV_OK},
                        ["train.tsv:1", "['sentence', 'lbl']", "'label'"]),
    "no text column": ("classification", {"train.tsv": "txt_a\tlabel\nx\t1\n", "dev.tsv": TSV_OK},
                       ["train.tsv:1", "['txt_a', 'label']", "sentence1/sentence2"]),
    "field count": ("classification", {"train.tsv": TSV_OK + "a\tb\t1\n", "dev.tsv": TSV_OK},
                    ["train.tsv:4", "3 tab-separated fields, expected 2"]),
    "empty label": ("classification", {"train.tsv": TSV_OK + "text\t \n", "dev.tsv": TSV_OK},
                    ["train.tsv:4", "empty label"]),
    "empty split": ("classification", {"train.tsv": TSV_OK, "dev.tsv": "sentence\tlabel\n\n"},
                    ["dev.tsv", "no examples"]),
    "label line": ("sst2", {"x.train": "1 good\n0\n", "x.dev": "1 ok\n"}, ["x.train:2", "'<label> <sentence>'"]),
    "unseen dev label": ("classification", {"x.train": "1 a\n0 b\n", "x.dev": "1 c\n\n2 d\n"},
                         ["x.dev:3", "'2'", "x.train", "['0', '1']"]),
    "one label": ("classification", {"x.train": "1 a\n1 b\n", "x.dev": "1 c\n"}, ["x.train", "only one label"]),
    "pairs for single": ("classification", {"train.tsv": "sentence1\tsentence2\tlabel\na\tb\t1\n",
                                            "dev.tsv": TSV_OK}, ["train.tsv", "'pair-classification'"]),
    "single for pairs": ("rte", {"train.tsv": TSV_OK, "dev.tsv": TSV_OK}, ["train.tsv", "'classification'"]),
    "bad bio tag": ("ner", {"train.conll": "a\tB-per\n\nb\tU-per\n", "dev.conll": "a\tO\n"},
                    ["train.conll:3", "'U-per'", "BIO"]),
    "no tag": ("ner", {"train.conll": "a\tB-per\nb\n", "dev.conll": "a\tO\n"}, ["train.conll:2", "'b'"]),
    "unseen dev type": ("ner", {"x_train.conll": "a\tB-per\n", "x_dev.conll": "a\tO\n\nb\tO\nc\tB-loc\n"},
                        ["x_dev.conll:4", "'loc'", "['per']"]),
    "all O": ("ner", {"train.conll": "a\tO\n", "dev.conll": "a\tO\n"}, ["train.conll", "every tag is 'O'"]),
    "bad json": ("causal-lm", {"train.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": \n',
                               "dev.jsonl": "{}"}, ["train.jsonl:2", "invalid JSON"]),
    "json keys": ("causal-lm", {"train.jsonl": '{"input": "a", "output": "b"}\n', "dev.jsonl": "{}"},
                  ["train.jsonl:1", "['input', 'output']", "'prompt'"]),
    "empty completion": ("causal-lm", {"train.jsonl": '{"prompt": "a", "completion": " "}\n', "dev.jsonl": ""},
                         ["train.jsonl:1", "empty 'completion'"]),
    "e2e no bars": ("e2e", {"valid.txt": "name : A||ref\nname : B | ref\n", "test.txt": "a||b\n"},
                    ["valid.txt:2", "exactly one '||'"]),
    "e2e two bars": ("e2e", {"valid.txt": "a||b||c\n", "test.txt": "a||b\n"}, ["valid.txt:1", "'a||b||c'"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_errors_name_file_line_and_value(tmp_path, name):
    task, files, needles = CASES[name]
    _write(tmp_path, files)
    with pytest.raises(DataError) as err:
        load_task(task, tmp_path)
    message = str(err.value)
    for needle in needles:
        assert needle in message, f"{needle!r} missing from: {message}"


def test_task_name_and_directory_errors(tmp_path):
    with pytest.raises(DataError, match="unknown task 'sst3'.*'sst2'"):
        load_task("sst3", tmp_path)
    with pytest.raises(DataError, match="task 'ner' has no bundled data; pass a data directory"):
        load_task("ner", None)
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_task("sst2", tmp_path / "nowhere")
    with pytest.raises(DataError, match="no bundled data for task 'ner'"):
        bundled_data_dir("ner")


# ------------------------------------------------------------------------------ tokenization: MiniLM


def test_token_labels_on_first_subword_by_hand(minilm_tokenizer):
    tok = minilm_tokenizer
    labels = ["O", "B-location", "I-location"]
    ex = TokenExample(["Empire", "State", "Building", "=", "ESB", ".", "\ufe0f"],
                      ["B-location", "I-location", "I-location", "O", "B-location", "O", "O"])
    (item,) = encode([ex], "token_classification", tok, labels, max_length=32)
    # U+FE0F (in WNUT dev) normalizes to nothing: it stands in as [UNK] so it keeps its label
    assert tok.convert_ids_to_tokens(item["input_ids"]) == [
        "[CLS]", "empire", "state", "building", "=", "es", "##b", ".", "[UNK]", "[SEP]"]
    assert item["labels"] == [-100, 1, 2, 2, 0, 1, -100, 0, 0, -100]
    assert item["attention_mask"] == [1] * 10 and item["token_type_ids"] == [0] * 10
    assert ex.tokens[-1] == "\ufe0f"  # the caller's example is not modified
    (short,) = encode([ex], "token_classification", tok, labels, max_length=4)
    assert short["labels"] == [-100, 1, 2, -100]


def _expected_token_item(tok, ex, labels, max_length):
    """Independent of word_ids(): tokenize word by word; tag on the first piece, -100 elsewhere."""
    ids, lab = [tok.cls_token_id], [IGNORE_INDEX]
    for word, tag in zip(ex.tokens, ex.tags, strict=True):
        pieces = tok.convert_tokens_to_ids(tok.tokenize(word) or [tok.unk_token])
        ids += pieces
        lab += [labels.index(tag)] + [IGNORE_INDEX] * (len(pieces) - 1)
    ids, lab = ids[:max_length - 1], lab[:max_length - 1]  # truncation keeps the final [SEP]
    return ids + [tok.sep_token_id], lab + [IGNORE_INDEX]


def test_token_labels_match_word_by_word_tokenization_on_wnut(minilm_tokenizer):
    d = load_task("wnut17", None)
    sample = d.train[:40] + d.dev[:40]
    for max_length in (512, 12):
        items = encode(sample, "token_classification", minilm_tokenizer, d.labels, max_length)
        for ex, item in zip(sample, items, strict=True):
            ids, lab = _expected_token_item(minilm_tokenizer, ex, d.labels, max_length)
            assert (item["input_ids"], item["labels"]) == (ids, lab)
    # untruncated, every word of the dev split keeps exactly one label
    items = encode(d.dev, "token_classification", minilm_tokenizer, d.labels, 512)
    assert sum(x != IGNORE_INDEX for item in items for x in item["labels"]) == 15733


def test_classification_encoding_pairs(minilm_tokenizer):
    tok = minilm_tokenizer
    ex = TextExample("A dog runs.", "An animal moves.", "not_entailment")
    (item,) = encode([ex], "classification", tok, ["entailment", "not_entailment"], max_length=64)
    a, b = (tok.convert_tokens_to_ids(tok.tokenize(s)) for s in (ex.text, ex.text_pair))
    assert item["input_ids"] == [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
    assert item["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert item["labels"] == 1
    with pytest.raises(DataError, match="label 'maybe' is not in the label list"):
        encode([TextExample("x", None, "maybe")], "classification", tok, ["a", "b"], 16)
    items = encode(load_task("rte", None).dev[:8], "classification", tok, ["entailment", "not_entailment"], 40)
    assert max(len(it["input_ids"]) for it in items) == 40


# ---------------------------------------------------------------------- tokenization: byte-level BPE LM


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A GPT-2-style tokenizer (byte-level BPE, eos only, no pad) trained here on E2E lines: no download."""
    from tests.train.conftest import bpe_tokenizer as build

    return build()


def test_lm_labels_mask_prompt_and_padding(bpe_tokenizer):
    tok = bpe_tokenizer
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.pad_token_id is None and pad_token_id(tok) == eos
    examples = load_task("e2e", None).dev[:2] + [LMExample("name : Zizzi", "Zizzi is cheap £ café .")]
    items = encode(examples, "causal_lm", tok, [], max_length=256)
    for ex, item in zip(examples, items, strict=True):
        n_prompt = len(tok(ex.prompt + LM_SEPARATOR)["input_ids"])
        ids, lab = item["input_ids"], item["labels"]
        assert lab[:n_prompt] == [IGNORE_INDEX] * n_prompt and lab[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[:n_prompt]) == ex.prompt + LM_SEPARATOR
        assert tok.decode(ids[n_prompt:-1]) == " " + ex.completion and ids[-1] == eos
    batch = collate(items, pad_token_id(tok))
    width = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["input_ids"][row, n:].eq(eos).all() and batch["labels"][row, n:].eq(-100).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    # with HF's shift, exactly the completion tokens + eos are scored
    scored = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert scored == sum(len(tok(" " + ex.completion)["input_ids"]) + 1 for ex in examples)


def test_lm_truncation(bpe_tokenizer):
    ex = LMExample("name : Zizzi | area : riverside", "Zizzi is by the river .")
    n_prompt = len(bpe_tokenizer(ex.prompt + LM_SEPARATOR)["input_ids"])
    (item,) = encode([ex], "causal_lm", bpe_tokenizer, [], max_length=n_prompt + 2)
    assert len(item["input_ids"]) == n_prompt + 2 and item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    with pytest.raises(DataError, match=f"prompt alone is {n_prompt} tokens, max_length is {n_prompt}"):
        encode([ex], "causal_lm", bpe_tokenizer, [], max_length=n_prompt)


# ------------------------------------------------------------------------------------ batching, collate


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 300), st.integers(1, 17), st.integers(0, 3), st.booleans(), st.booleans())
def test_batches_cover_every_index_once(n, batch_size, epoch, shuffle, sort_by_length):
    lengths = [(i * 7919) % 53 for i in range(n)]
    batches = make_batches(n, lengths, batch_size, seed=5, epoch=epoch, shuffle=shuffle,
                           sort_by_length=sort_by_length)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(1 <= len(b) <= batch_size for b in batches) and len(batches) == -(-n // batch_size)
    assert batches == make_batches(n, lengths, batch_size, 5, epoch, shuffle, sort_by_length)
    if sort_by_length:
        assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in batches)


def test_batches_depend_on_seed_and_epoch_and_cut_padding():
    lengths = [(i * 7919) % 97 + 1 for i in range(2000)]
    runs = {(s, e): make_batches(2000, lengths, 8, s, e, True, True) for s in (0, 1) for e in (0, 1)}
    assert len({str(b) for b in runs.values()}) == 4
    def padding(batches):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    unsorted = make_batches(2000, lengths, 8, 0, 0, True, False)
    assert padding(runs[0, 0]) < padding(unsorted) / 5
    assert make_batches(5, [], 2, 0, 0, shuffle=False, sort_by_length=False) == [[0, 1], [2, 3], [4]]
    # pinned: the same on every run and machine (str seeds are hashed with sha512, not PYTHONHASHSEED)
    assert make_batches(6, [3, 1, 2, 9, 4, 4], 2, seed=0, epoch=0) == [[1, 2], [5, 3], [0, 4]]
    unsorted = make_batches(10, [0] * 10, 3, seed=1, epoch=2, sort_by_length=False)
    assert unsorted == [[1, 7, 4], [0], [8, 5, 6], [9, 2, 3]]
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        make_batches(3, [1, 1, 1], 0, 0, 0)
    with pytest.raises(ValueError, match="lengths has 2 entries but n_items is 3"):
        make_batches(3, [1, 1], 2, 0, 0)


def test_collate_pads_each_key_with_its_own_value():
    items = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1], "labels": [-100, 2, 3]},
             {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": [1]}]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [1, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    cls = collate([{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 1},
                   {"input_ids": [3], "attention_mask": [1], "labels": 0}], pad_id=9)
    assert cls["labels"].tolist() == [1, 0] and cls["input_ids"].tolist() == [[1, 2], [3, 9]]
    with pytest.raises(ValueError, match="cannot pad key 'extra'"):
        collate([{"input_ids": [1], "extra": [1]}], pad_id=0)
