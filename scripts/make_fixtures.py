#!/usr/bin/env python3
"""Golden-fixture generator for `latte-models` (Rust port of PyLate ColBERT models).

What it does
------------
Builds tiny random-weight models entirely locally (no Hugging Face Hub access):

* a BERT-style WordPiece tokenizer and a ModernBERT-style byte-level BPE tokenizer,
  both trained on ../shared/data/rustbooks/corpus.jsonl (or ``--corpus``);
* a tiny ``BertModel`` and a tiny ``ModernBertModel`` (random init, seeded);

then, for every *case*, writes a model folder exactly as a user would have it
(PyLate folder, sentence-transformers folder, plain HF folder, Stanford-NLP ColBERT
checkpoint, bf16/f16 sharded folder, pytorch_model.bin folder, ...), loads it with
``pylate.models.ColBERT`` and stores PyLate's outputs (token ids, attention masks,
query / document embeddings, document embeddings with ``pool_factor=2``) as
``expected/<case>.safetensors`` + ``expected/<case>.json``.

Output layout (``crates/latte-models/tests/fixtures`` = F; deleted and recreated
on every run)::

    F/README.md
    F/models/<model>/...          model folders loaded by the Rust tests
    F/expected/<case>.json        settings, texts, module list, repr, ...
    F/expected/<case>.safetensors query_emb.{i}, doc_emb.{i}, doc_pool2.{i} (f32 [tokens, dim]),
                                  query_ids.{i}, query_mask.{i}, doc_ids.{i}, doc_mask.{i} (i64 [len])

How to run (from the repository root; CPU only, ~1-2 minutes, 2 cores are plenty)::

    python -m venv $WORK/venv && $WORK/venv/bin/pip install -r scripts/requirements-fixtures.txt
    HF_HUB_OFFLINE=1 $WORK/venv/bin/python scripts/make_fixtures.py

Pinned versions the committed fixtures were produced with:
    pylate==1.6.0, sentence-transformers==5.3.0, transformers==5.3.0,
    tokenizers==0.22.2, torch==2.11 (CPU), safetensors, numpy, scipy 1.17.1, Python 3.11.

Determinism: every random draw is seeded (python/numpy/torch, reseeded per case),
torch runs single-threaded, and the output directory is deleted and recreated.
Running the script twice yields byte-identical ``expected/*`` files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file as np_save_file  # noqa: E402
from safetensors.torch import load_file as pt_load_file  # noqa: E402
from safetensors.torch import save_file as pt_save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402
from torch import nn  # noqa: E402

import pylate  # noqa: E402
import sentence_transformers  # noqa: E402
import transformers  # noqa: E402
from pylate.models import ColBERT, Dense  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers import models as st_models  # noqa: E402
from sentence_transformers.util import fullname  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BertTokenizer,
    ModernBertConfig,
    ModernBertModel,
    PreTrainedTokenizerFast,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "crates" / "latte-models" / "tests" / "fixtures"
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "rustbooks" / "corpus.jsonl"
SEED = 1234
BERT_VOCAB = 640  # WordPiece vocab size (incl. 8 specials)
MB_VOCAB = 640  # byte-level BPE vocab size (incl. 5 specials appended at the end)

# --------------------------------------------------------------------------------------
# Texts (identical for every case)
# --------------------------------------------------------------------------------------

LONG_QUERY = (
    "I am trying to understand how the borrow checker decides when a mutable reference "
    "is still alive, because my program stores a reference to an element of a vector in "
    "a struct, then pushes another element onto the same vector inside a loop, and the "
    "compiler complains that I cannot borrow the vector as mutable more than once at a "
    "time, so what is the idiomatic fix here?"
)

LONG_DOCUMENT = " ".join(
    [
        "Rust is a systems programming language focused on safety, speed, and concurrency.",
        "Ownership is the central feature of the language: each value has a single owner,",
        "and when the owner goes out of scope the value is dropped and its memory is freed.",
        "References allow you to refer to a value without taking ownership of it, and the",
        "borrow checker makes sure that every reference is valid for as long as it is used.",
        "At any given time you can have either one mutable reference or any number of",
        "immutable references, but never both at once. This rule prevents data races at",
        "compile time, which is one of the reasons Rust programs are reliable. Lifetimes",
        "describe the scope for which a reference is valid; most of the time they are",
        "inferred, but sometimes the compiler needs annotations such as 'a to relate the",
        "lifetimes of several references to each other. Traits define shared behaviour in",
        "an abstract way, and generic functions use trait bounds to specify that a type",
        "parameter must implement a particular behaviour. Smart pointers like Box, Rc, and",
        "RefCell add capabilities beyond those provided by references: Box stores data on",
        "the heap, Rc enables multiple ownership through reference counting, and RefCell",
        "moves the borrowing rules from compile time to run time. Closures are anonymous",
        "functions that can capture their environment, and iterators provide a lazy way to",
        "process sequences of elements with adapters such as map, filter, and fold. Error",
        "handling is explicit: recoverable errors use the Result type while unrecoverable",
        "errors call the panic macro. Cargo, the build system and package manager, compiles",
        "your code, downloads dependencies, runs tests, and builds documentation. Modules",
        "and crates organise larger projects, and the visibility rules decide which items",
        "are public. Fearless concurrency lets threads share data safely through channels,",
        "mutexes, and atomic reference counting, all checked by the type system before the",
        "program ever runs. Unsafe code exists for the rare cases where the compiler cannot",
        "verify safety on its own, such as calling foreign functions or dereferencing raw",
        "pointers, and it should be wrapped in safe abstractions whenever possible.",
    ]
)

QUERIES = [
    "what is ownership?",
    "How do I borrow a mutable reference twice",
    "",
    "!!!???",
    "Crème brûlée — 東京 😀 naïve café",
    LONG_QUERY,
    "  padded   spaces  ",
    "Traits",
]

DOCUMENTS = [
    "Ownership is a set of rules that govern how a Rust program manages memory.",
    "",
    "...,;!",
    "Crème brûlée — 東京 😀 naïve café",
    LONG_DOCUMENT,
    "Borrowing checks lifetimes",
    "HELLO WORLD",
    (
        "A vector, written Vec<T>, stores values of the same type next to each other in "
        "memory; you can push, pop, and index into it. However, holding a reference to an "
        "element while pushing is an error! Why? Because pushing may reallocate (and move) "
        "the whole buffer."
    ),
    "first line\twith a tab\nsecond line",
    "[Q] literally",
]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def corpus_texts(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            text = (rec.get("title", "") + " " + rec.get("text", "")).strip()
            if text:
                out.append(text)
    return out


def build_bert_tokenizer(texts: list[str], out_dir: Path) -> BertTokenizer:
    """WordPiece vocab ~800 with bert-base-uncased-like pipeline and special layout."""
    specials = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    alphabet = list(string.punctuation) + list(string.ascii_lowercase) + list(string.digits)
    trainer = trainers.WordPieceTrainer(
        vocab_size=BERT_VOCAB,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet) + 20,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    vocab = tok.get_vocab()
    # The trainer's *set* of tokens is deterministic, but the ids of the single-character
    # alphabet ("x" and "##x") come out of a HashMap and change between runs. Canonicalise:
    # specials first, then the alphabet sorted by string, then merged tokens in training order.
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    is_alpha = lambda t: len(t) == 1 or (t.startswith("##") and len(t) == 3)  # noqa: E731
    rest = [t for t in ordered if t not in specials]
    alpha = sorted((t for t in rest if is_alpha(t)), key=lambda t: (t.startswith("##"), t))
    merged = [t for t in rest if not is_alpha(t)]
    vocab = {t: i for i, t in enumerate(specials + alpha + merged)}
    for i, s in enumerate(specials):
        assert vocab[s] == i, (s, vocab.get(s))
    for p in string.punctuation:
        assert p in vocab, f"punctuation {p!r} missing from vocab"
    # Rebuild like bert-base-uncased: only PAD/UNK/CLS/SEP/MASK are added special tokens,
    # [unusedN] are plain vocab entries.
    hf_tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def build_modernbert_tokenizer(texts: list[str], out_dir: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-NeoX style as in ModernBERT), specials appended at the end."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=MB_VOCAB - 5,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(
        [
            AddedToken("[UNK]", special=True, normalized=False),
            AddedToken("[CLS]", special=True, normalized=False),
            AddedToken("[SEP]", special=True, normalized=False),
            AddedToken("[PAD]", special=True, normalized=False),
            AddedToken("[MASK]", lstrip=True, special=True, normalized=False),
        ]
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=256,
        clean_up_tokenization_spaces=True,
    )
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def add_variance(model: nn.Module, seed: int) -> None:
    """Randomise LayerNorm weights/biases and all biases so outputs are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            lname = name.lower()
            if ("norm" in lname) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build_bert(tokenizer, out_dir: Path) -> None:
    seed_everything(SEED + 1)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        # 192 (not 128): PyLate's default document_length=180 would index past 128 positions.
        max_position_embeddings=192,
        hidden_act="gelu",
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Keep the pooler like real BERT checkpoints: ColBERT never uses it (extra weights to ignore).
    model = BertModel(cfg, add_pooling_layer=True)
    add_variance(model, SEED + 2)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_modernbert(tokenizer, out_dir: Path) -> None:
    seed_everything(SEED + 3)
    cfg = ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=256,
        local_attention=8,
        global_attn_every_n_layers=2,
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = ModernBertModel(cfg)
    add_variance(model, SEED + 4)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def module_info(m: ColBERT) -> list[dict]:
    out = []
    for mod in m:
        if isinstance(mod, st_models.Transformer):
            out.append({"type": "Transformer"})
        elif isinstance(mod, Dense):
            out.append(
                {
                    "type": "Dense",
                    "in_features": mod.in_features,
                    "out_features": mod.out_features,
                    "bias": bool(mod.bias),
                    "activation_function": fullname(mod.activation_function),
                    "use_residual": bool(mod.use_residual),
                }
            )
        else:
            out.append({"type": type(mod).__name__})
    return out


def to_np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.ascontiguousarray(x)


def write_expectations(
    F: Path, case: str, model_folder: str, kwargs: dict, exact: bool, model_kwargs: dict | None = None,
    notes: str | None = None, query_encode_kwargs: dict | None = None, doc_encode_kwargs: dict | None = None,
) -> dict:
    seed_everything(SEED + 100)
    load_kwargs = dict(kwargs)
    if model_kwargs:
        load_kwargs["model_kwargs"] = model_kwargs
    m = ColBERT(str(F / model_folder), device="cpu", **load_kwargs)
    m.eval()

    qk, dk = dict(query_encode_kwargs or {}), dict(doc_encode_kwargs or {})
    q = m.encode(QUERIES, is_query=True, batch_size=3, show_progress_bar=False, **qk)
    d = m.encode(DOCUMENTS, is_query=False, batch_size=3, show_progress_bar=False, **dk)
    d2 = m.encode(DOCUMENTS, is_query=False, batch_size=3, pool_factor=2, show_progress_bar=False, **dk)
    max_seq_length = m[0].max_seq_length

    tensors: dict[str, np.ndarray] = {}
    for i, e in enumerate(q):
        tensors[f"query_emb.{i}"] = to_np(e).astype(np.float32)
    for i, e in enumerate(d):
        tensors[f"doc_emb.{i}"] = to_np(e).astype(np.float32)
    for i, e in enumerate(d2):
        tensors[f"doc_pool2.{i}"] = to_np(e).astype(np.float32)
    for prefix, texts, is_query in (("query", QUERIES, True), ("doc", DOCUMENTS, False)):
        for i, t in enumerate(texts):
            tok = m.tokenize([t], is_query=is_query)
            tensors[f"{prefix}_ids.{i}"] = to_np(tok["input_ids"][0]).astype(np.int64)
            tensors[f"{prefix}_mask.{i}"] = to_np(tok["attention_mask"][0]).astype(np.int64)

    param_dtypes = sorted({str(p.dtype) for p in m.parameters()})

    # Cross-checks (informational, for choosing tolerances / attention semantics in Rust):
    # the same model encoded one text at a time (no batch padding) and with eager attention.
    def max_diff(a, b) -> float:
        diffs = [float(np.abs(to_np(x) - to_np(y)).max()) for x, y in zip(a, b) if to_np(x).size]
        return float(f"{max(diffs):.2e}")

    cross = {}
    q1 = m.encode(QUERIES, is_query=True, batch_size=1, show_progress_bar=False, **qk)
    d1 = m.encode(DOCUMENTS, is_query=False, batch_size=1, show_progress_bar=False, **dk)
    cross["batch_size_1"] = {"queries": max_diff(q, q1), "documents": max_diff(d, d1)}
    if exact:
        seed_everything(SEED + 100)
        me = ColBERT(str(F / model_folder), device="cpu", **{
            **load_kwargs, "model_kwargs": {**(model_kwargs or {}), "attn_implementation": "eager"}})
        qe = me.encode(QUERIES, is_query=True, batch_size=3, show_progress_bar=False, **qk)
        de = me.encode(DOCUMENTS, is_query=False, batch_size=3, show_progress_bar=False, **dk)
        cross["eager_attention"] = {"queries": max_diff(q, qe), "documents": max_diff(d, de)}
        del me
    m.tokenize(DOCUMENTS[:1], is_query=False)  # restore max_seq_length state (cosmetic)
    emb = m[0].auto_model.get_input_embeddings().weight
    info = {
        "case": case,
        "model": model_folder,
        "kwargs": kwargs,
        **({"query_encode_kwargs": qk} if qk else {}),
        **({"doc_encode_kwargs": dk} if dk else {}),
        "exact": exact,
        "attn_implementation": str(m[0].auto_model.config._attn_implementation),
        "compute_dtype": param_dtypes,
        "queries": QUERIES,
        "documents": DOCUMENTS,
        "resolved": {
            "query_prefix": m.query_prefix,
            "document_prefix": m.document_prefix,
            "query_prefix_id": m.query_prefix_id,
            "document_prefix_id": m.document_prefix_id,
            "query_length": m.query_length,
            "document_length": m.document_length,
            "do_query_expansion": m.do_query_expansion,
            "attend_to_expansion_tokens": m.attend_to_expansion_tokens,
            "skiplist_words": m.skiplist_words,
            "skiplist": [int(x) for x in m.skiplist],
            "pad_token_id": m.tokenizer.pad_token_id,
            "mask_token_id": m.tokenizer.mask_token_id,
            "tokenizer_len": len(m.tokenizer),
            "embedding_rows": int(emb.shape[0]),
            "max_seq_length": max_seq_length,
            "do_lower_case": bool(m[0].do_lower_case),
        },
        "modules": module_info(m),
        "cross_checks_max_abs_diff": cross,
        "repr": str(m),
    }
    if model_kwargs:
        info["model_kwargs_note"] = "loaded with model_kwargs=" + repr(model_kwargs)
    if notes:
        info["notes"] = notes
    (F / "expected").mkdir(parents=True, exist_ok=True)
    np_save_file(tensors, str(F / "expected" / f"{case}.safetensors"))
    with open(F / "expected" / f"{case}.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"[{case}] {info['modules']} dtype={param_dtypes} attn={info['attn_implementation']}", flush=True)
    return info


def new_colbert(seed: int, *args, **kwargs) -> ColBERT:
    seed_everything(seed)
    return ColBERT(*args, device="cpu", **kwargs)


def save_and_check(m: ColBERT, path: Path, **save_kwargs) -> None:
    if path.exists():
        shutil.rmtree(path)
    # No model card: README.md is irrelevant for loading and only costs fixture space.
    m.save(str(path), create_model_card=False, **save_kwargs)


def round_to(model: nn.Module, dtype: torch.dtype) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    F: Path = args.out
    if F.exists():
        shutil.rmtree(F)
    (F / "models").mkdir(parents=True)
    (F / "expected").mkdir(parents=True)
    M = F / "models"

    texts = corpus_texts(args.corpus)
    tmp = Path(tempfile.mkdtemp(prefix="latte_fixtures_"))
    try:
        run_all(F, M, tmp, texts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_readme(F)


def run_all(F: Path, M: Path, tmp: Path, texts: list[str]) -> None:
    # ---- tokenizers + base models ----------------------------------------------------
    bert_tok = build_bert_tokenizer(texts, tmp / "bert_tok")
    mb_tok = build_modernbert_tokenizer(texts, tmp / "mb_tok")

    bert_dir = M / "bert_plain_hf"  # case 8/9 folder == the plain tiny BERT used everywhere
    build_bert(bert_tok, bert_dir)
    mb_dir = tmp / "modernbert_plain"
    build_modernbert(mb_tok, mb_dir)

    # ---- 1. bert_pylate --------------------------------------------------------------
    m = new_colbert(SEED + 10, str(bert_dir), embedding_size=16)
    save_and_check(m, M / "bert_pylate")
    write_expectations(F, "bert_pylate", "models/bert_pylate", {}, True)

    # ---- 2. bert_pylate_noexp -------------------------------------------------------
    m = new_colbert(SEED + 20, str(bert_dir), embedding_size=16, do_query_expansion=False,
                    query_length=12, document_length=20)
    save_and_check(m, M / "bert_pylate_noexp")
    write_expectations(F, "bert_pylate_noexp", "models/bert_pylate_noexp", {}, True)

    # ---- 3. bert_pylate_attend ------------------------------------------------------
    m = new_colbert(SEED + 30, str(bert_dir), embedding_size=16, attend_to_expansion_tokens=True,
                    query_prefix="[unused0]", document_prefix="[unused1]", query_length=16,
                    document_length=24, skiplist_words=["the", "!", "xyzunknownword", "?"])
    save_and_check(m, M / "bert_pylate_attend")
    write_expectations(F, "bert_pylate_attend", "models/bert_pylate_attend", {}, True)

    # ---- 4. bert_dense_chain --------------------------------------------------------
    seed_everything(SEED + 40)
    modules = [
        st_models.Transformer(str(bert_dir)),
        Dense(32, 48, bias=True, activation_function=nn.GELU()),
        Dense(48, 48, bias=False, activation_function=nn.ReLU(), use_residual=True),
        Dense(48, 24, bias=True, activation_function=nn.Tanh(), use_residual=True),
        Dense(24, 16, bias=False, activation_function=nn.Identity()),
    ]
    m = ColBERT(modules=modules, device="cpu")
    save_and_check(m, M / "bert_dense_chain")
    write_expectations(F, "bert_dense_chain", "models/bert_dense_chain", {}, True)

    # ---- 5. bert_dense_acts ---------------------------------------------------------
    seed_everything(SEED + 50)
    modules = [
        st_models.Transformer(str(bert_dir)),
        Dense(32, 40, bias=True, activation_function=nn.SiLU()),
        Dense(40, 40, bias=True, activation_function=nn.Sigmoid(), use_residual=True),
        Dense(40, 36, bias=False, activation_function=nn.LeakyReLU(), use_residual=True),
        Dense(36, 36, bias=True, activation_function=nn.ELU()),
        Dense(36, 28, bias=True, activation_function=nn.Softplus(), use_residual=True),
        Dense(28, 28, bias=False, activation_function=nn.Hardswish(), use_residual=True),
        Dense(28, 16, bias=True, activation_function=nn.Mish()),
    ]
    m = ColBERT(modules=modules, device="cpu")
    save_and_check(m, M / "bert_dense_acts")
    write_expectations(F, "bert_dense_acts", "models/bert_dense_acts", {}, True)

    # ---- 6/7. bert_st_dense (sentence-transformers folder) --------------------------
    seed_everything(SEED + 60)
    st = SentenceTransformer(
        modules=[
            st_models.Transformer(str(bert_dir)),
            st_models.Pooling(32),
            st_models.Dense(32, 24, bias=True, activation_function=nn.Tanh()),
            st_models.Dense(24, 16, bias=False, activation_function=nn.Identity()),
            st_models.Normalize(),
        ],
        device="cpu",
    )
    st.save(str(M / "bert_st_dense"), create_model_card=False)
    st_kwargs = {"query_prefix": "[unused0]", "document_prefix": "[unused1]"}
    write_expectations(F, "bert_st_dense", "models/bert_st_dense", st_kwargs, True)
    write_expectations(
        F, "bert_st_dense_default", "models/bert_st_dense", {}, False,
        notes="PyLate appends '[Q] '/'[D] ' tokens with randomly initialised embedding rows: "
              "only ids, settings, modules and shapes are reproducible.",
    )

    # ---- 8/9. bert_plain_hf ---------------------------------------------------------
    write_expectations(
        F, "bert_plain_hf", "models/bert_plain_hf", {}, False,
        notes="Random Dense(32->128) and random '[Q] '/'[D] ' embedding rows are created at load.",
    )
    write_expectations(
        F, "bert_plain_hf_inv", "models/bert_plain_hf",
        {"query_prefix": "[unused0]", "document_prefix": "[unused1]", "embedding_size": 24}, False,
        notes="Random Dense(32->24) is created at load; token ids are exact.",
    )

    # ---- 10/11. Stanford-NLP checkpoints -------------------------------------------
    seed_everything(SEED + 70)
    base_sd = pt_load_file(str(bert_dir / "model.safetensors"))
    stanford_sd = {f"bert.{k}": v.contiguous() for k, v in base_sd.items()}
    stanford_sd["linear.weight"] = (torch.randn(16, 32) * 0.2).contiguous()
    bert_cfg = json.loads((bert_dir / "config.json").read_text())
    bert_cfg["architectures"] = ["HF_ColBERT"]
    for name, use_bin, with_meta in (("bert_stanford_st", False, True), ("bert_stanford_bin", True, False)):
        d = M / name
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(bert_cfg, indent=2, sort_keys=True) + "\n")
        for fn in bert_dir.iterdir():
            if fn.name.startswith("tokenizer") or fn.name in ("special_tokens_map.json", "vocab.txt"):
                shutil.copy(fn, d / fn.name)
        if use_bin:
            torch.save(stanford_sd, d / "pytorch_model.bin")
        else:
            pt_save_file(stanford_sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        if with_meta:
            meta = {
                "query_token_id": "[unused0]",
                "doc_token_id": "[unused1]",
                "query_maxlen": 20,
                "doc_maxlen": 40,
                "attend_to_mask_tokens": False,
                "mask_punctuation": True,
                "dim": 16,
                "similarity": "cosine",
            }
            (d / "artifact.metadata").write_text(json.dumps(meta, indent=4) + "\n")
        write_expectations(F, name, f"models/{name}", {}, True)

    # ---- 12. bert_f16_sharded ------------------------------------------------------
    m = new_colbert(SEED + 80, str(bert_dir), embedding_size=16)
    round_to(m[0].auto_model, torch.bfloat16)
    round_to(m[1], torch.float16)
    d = M / "bert_f16_sharded"
    save_and_check(m, d)
    for fn in list(d.iterdir()):
        if fn.name.startswith("model") and fn.suffix in (".safetensors", ".json"):
            fn.unlink()
    bf16_model = m[0].auto_model.to(torch.bfloat16)
    bf16_model.save_pretrained(str(d), max_shard_size="60KB")
    m[0].auto_model.to(torch.float32)
    dense_sd = {k: v.to(torch.float16).contiguous() for k, v in m[1].state_dict().items()}
    (d / "1_Dense" / "model.safetensors").unlink()
    pt_save_file(dense_sd, str(d / "1_Dense" / "model.safetensors"), metadata={"format": "pt"})
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / "model.safetensors.index.json").exists(), shards
    info = write_expectations(
        F, "bert_f16_sharded", "models/bert_f16_sharded", {}, True,
        model_kwargs={"dtype": torch.float32},
        notes="Transformer stored as bf16 shards, 1_Dense as f16; PyLate loaded with "
              "model_kwargs={'dtype': torch.float32} so it computes in f32 (see compute_dtype).",
    )
    assert info["compute_dtype"] == ["torch.float32"], info["compute_dtype"]

    # ---- 13. bert_bin ---------------------------------------------------------------
    m = new_colbert(SEED + 90, str(bert_dir), embedding_size=16)
    d = M / "bert_bin"
    save_and_check(m, d, safe_serialization=False)
    # transformers 5 ignores safe_serialization=False (always writes safetensors):
    # convert the backbone to pytorch_model.bin by hand so the folder is all-.bin.
    if (d / "model.safetensors").exists():
        sd = pt_load_file(str(d / "model.safetensors"))
        (d / "model.safetensors").unlink()
        torch.save(sd, d / "pytorch_model.bin")
    assert (d / "pytorch_model.bin").exists() and (d / "1_Dense" / "pytorch_model.bin").exists()
    assert not list(d.rglob("*.safetensors"))
    write_expectations(F, "bert_bin", "models/bert_bin", {}, True)

    # ---- 14. modernbert_pylate ------------------------------------------------------
    m = new_colbert(SEED + 140, str(mb_dir), embedding_size=16, document_length=64)
    save_and_check(m, M / "modernbert_pylate")
    write_expectations(F, "modernbert_pylate", "models/modernbert_pylate", {}, True)

    # ---- 15. modernbert_noexp -------------------------------------------------------
    m = new_colbert(SEED + 150, str(mb_dir), embedding_size=16, do_query_expansion=False, query_length=16)
    save_and_check(m, M / "modernbert_noexp")
    write_expectations(F, "modernbert_noexp", "models/modernbert_noexp", {}, True)


def write_readme(F: Path) -> None:
    text = f"""# latte-models golden fixtures

Generated by `scripts/make_fixtures.py` — do not edit by hand. Regenerate from the repo root with

```
$WORK/venv/bin/pip install -r scripts/requirements-fixtures.txt
HF_HUB_OFFLINE=1 $WORK/venv/bin/python scripts/make_fixtures.py
```

Versions used: pylate {pylate.__version__}, sentence-transformers {sentence_transformers.__version__},
transformers {transformers.__version__}, torch {torch.__version__}, tokenizers {__import__('tokenizers').__version__},
numpy {np.__version__}, Python {sys.version.split()[0]}. CPU, single thread, all seeds fixed.

* `models/<name>/` — tiny random-weight model folders (hidden 32) as a user would have them:
  PyLate folders (`bert_pylate*`, `bert_dense_*`, `bert_bin`, `bert_f16_sharded`, `modernbert_*`),
  a sentence-transformers folder (`bert_st_dense`), a plain HF BERT (`bert_plain_hf`) and
  Stanford-NLP ColBERT checkpoints (`bert_stanford_st` with artifact.metadata + safetensors,
  `bert_stanford_bin` with pytorch_model.bin and no metadata). Tokenizers were trained on the
  rustbooks BEIR corpus (WordPiece, BERT-uncased normaliser; byte-level BPE for ModernBERT).
* `expected/<case>.json` — texts, explicit ColBERT kwargs, resolved PyLate settings, module
  list, `repr(model)`, attention implementation, and `exact` (false ⇒ PyLate initialised some
  weights randomly at load, so only ids / settings / modules / shapes are comparable).
* `expected/<case>.safetensors` — `query_emb.i`, `doc_emb.i`, `doc_pool2.i` (f32 `[tokens, dim]`,
  L2-normalised, from `encode(..., batch_size=3)`, `pool_factor=2` for doc_pool2) and
  `query_ids.i`, `query_mask.i`, `doc_ids.i`, `doc_mask.i` (i64, from `tokenize([text])`).
* `cross_checks_max_abs_diff` in each json: PyLate vs itself with `batch_size=1` (no batch padding)
  and with `attn_implementation="eager"` — all ≤ ~5e-7 except `modernbert_pylate` queries (see below).

## PyLate / transformers behaviour worth knowing (pylate 1.6.0, transformers 5.3.0, torch 2.11 CPU)

* Attention implementation on CPU is `sdpa` for BERT and ModernBERT. With query expansion and
  `attend_to_expansion_tokens=False`, ModernBERT's sliding-window layers (window |i-j| <= local_attention/2 = 4,
  layers 1 and 3) have *fully masked* query rows for [MASK] expansion tokens far from real tokens.
  torch SDPA returns **0** for such rows, eager attention returns the mean of V over all positions:
  `modernbert_pylate` query embeddings differ by ~6.6e-2 between the two. The fixtures use sdpa (zeros).
* transformers 5 `save_pretrained` of a BERT that was *loaded from disk* writes LayerNorm params as
  `LayerNorm.gamma` / `LayerNorm.beta` (legacy names); a freshly constructed one writes `weight`/`bias`.
  So `bert_plain_hf` and the Stanford folders use weight/bias, all PyLate-saved BERT folders use gamma/beta.
* transformers 5 ignores `safe_serialization=False` for the backbone; `bert_bin/pytorch_model.bin` was written
  by hand (torch.save of the saved state dict); `1_Dense/pytorch_model.bin` comes from sentence-transformers.
* transformers 5 loads with dtype "auto": `bert_f16_sharded` without `model_kwargs` would run in bf16 (and PyLate
  then casts the Dense to bf16 too). The fixture was produced with `model_kwargs={{"dtype": torch.float32}}`;
  weights were pre-rounded to bf16 (backbone) / f16 (1_Dense) so the f32 computation is exact.
* PyLate's `add_tokens([prefix])` for an existing vocab entry (`[unused0]`) does not grow the vocab but the token
  becomes a (non-special, normalized) added token in the saved tokenizer.json. Default prefixes `"[Q] "`/`"[D] "`
  are non-special normalized added tokens, so the document text `"[Q] literally"` is tokenized to the `[Q] ` id.
* `tokenize("")` → `[CLS] <prefix> [SEP]` (+ [MASK] padding for expanded queries). sentence-transformers
  strips each text before tokenizing (matters for the byte-level ModernBERT tokenizer).
* Skiplist words that are not single vocab entries map to the UNK id, so `[UNK]` tokens are then skipped
  (`bert_pylate_attend`: "xyzunknownword").
* ColBERT(modules=[...]) adds `[Q] `/`[D] ` to the tokenizer and resizes embeddings just like the
  base-model path; sentence-transformers folders drop Pooling/Normalize (no `4_Normalize` dir is written).
* `sentence_bert_config.json` `max_seq_length` is whatever the Transformer had at save time (192 = BERT's
  max_position_embeddings here, since no tokenize() happened before save); PyLate overrides it at tokenize time.
* BERT `max_position_embeddings` is 192 (not 128) because PyLate's default `document_length` 180 needs 179 positions.
## Backbone cases (`scripts/make_backbone_fixtures.py`, run after `make_fixtures.py`)

* `xlmr_pylate` — tiny `XLMRobertaModel` (BPE/Metaspace tokenizer with XLM-R's `<s> <pad> </s> <unk> … <mask>`
  layout) as a PyLate folder. Positions start at `pad_token_id + 1`; PyLate pads and expands with `<mask>`,
  which is not the pad id, so expansion tokens get ordinary increasing positions.
* `jina_flash` — jina-colbert-v2-style Stanford checkpoint (`HF_ColBERT`, `model_type: xlm-roberta`,
  `position_embedding_type: rotary`, `auto_map`, `roberta.*` flash-layout weights + `linear.weight`,
  `artifact.metadata` with `[QueryMarker]`/`[DocumentMarker]`, `attend_to_mask_tokens: true`). The Hub is not
  reachable, so PyLate ran a minimal re-implementation of the CPU path of
  `jinaai/xlm-roberta-flash-implementation`, written into the folder only while generating (not committed).
* `gemma_st`, `gemma_prompts`, `gemma_noprompt` — tiny bidirectional `Gemma3TextModel` in a
  sentence-transformers folder with Dense(32→64) → Dense(64→32) (no bias, Identity) and `prompts`. No mask
  token: PyLate pads and expands with EOS. transformers halves `sliding_window` (`w // 2 + 1`) every time a
  bidirectional Gemma 3 config is *loaded*, and saves the halved value: the base model was built with 8, saved
  as 5, re-saved by sentence-transformers as 3, so PyLate runs with 2 (`|i - j| < 2`). With SDPA, query rows
  whose window holds no attended key get a zero attention output; eager attention differs by ~0.68 on
  `gemma_noprompt` queries.
"""
    (F / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
