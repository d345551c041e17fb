#!/usr/bin/env python3
"""Golden fixtures for the XLM-RoBERTa, jina-colbert-v2 (XLM-RoBERTa "flash" with rotary positions) and
Gemma 3 (EmbeddingGemma) backbones of `latte-models`.

Adds cases to ``crates/latte-models/tests/fixtures`` (the folder `make_fixtures.py` writes) without touching
the other cases; run it after `make_fixtures.py`::

    HF_HUB_OFFLINE=1 $WORK/venv/bin/python scripts/make_backbone_fixtures.py \
        --jina-remote-code /path/to/xlm-roberta-flash-implementation [--only jina_flash]

``--jina-remote-code`` names a folder holding the REAL remote code of ``jinaai/xlm-roberta-flash-implementation``
(``configuration_xlm_roberta.py``, ``modeling_xlm_roberta.py``, ``embedding.py``, ``rotary.py``, ``mha.py``,
``mlp.py``, ``block.py``, ``xlm_padding.py``, ``stochastic_depth.py`` …), e.g. from a machine with network::

    huggingface-cli download jinaai/xlm-roberta-flash-implementation --local-dir /tmp/jina_remote

It needs ``einops`` importable (``pip install einops``, or ``--extra-sys-path DIR`` for a ``pip install --target``
folder). The files are copied into the model folder only while PyLate loads it with ``trust_remote_code=True``
and removed afterwards: upstream code is never committed. Without the option the jina case falls back to the
minimal stand-in below (kept for machines without the remote code) and says so.

Under transformers 5.x the remote code needs two shims in the (temporary) copy: ``RotaryEmbedding`` must recompute
its non-persistent ``inv_freq`` buffer before building the cos/sin tables (``from_pretrained`` now builds on the
meta device and leaves that buffer uninitialised: garbage rotary frequencies, no error), and ``XLMRobertaModel``
needs ``get_input_embeddings`` returning ``self.embeddings.word_embeddings`` (no longer inferred; this script
reads it). The committed ``jina_flash`` expectations were generated this way (see its ``notes``).

Cases
-----
* ``xlmr_pylate`` — a tiny ``transformers.XLMRobertaModel`` (absolute positions that start at
  ``pad_token_id + 1``) turned into a PyLate model (``ColBERT(base, embedding_size=16)``, saved, reloaded).
* ``jina_flash`` — a jina-colbert-v2-style Stanford checkpoint: ``config.json`` with ``model_type
  xlm-roberta``, ``architectures ["HF_ColBERT"]``, ``position_embedding_type "rotary"``, ``auto_map`` to remote
  code, weights ``roberta.*`` in the flash layout (``emb_ln``, ``encoder.layers.N.mixer.Wqkv`` …) plus
  ``linear.weight``, and an ``artifact.metadata`` with ``[QueryMarker]``/``[DocumentMarker]``, encoded by
  PyLate running the real remote code (``--jina-remote-code``). Without it, the fallback stand-in is a minimal
  PyTorch re-implementation of the non-flash (CPU) path of ``jinaai/xlm-roberta-flash-implementation``
  (it agrees with the real code to 2.1e-7 on this fixture;
  embeddings without positions when rotary, post-norm blocks, fused ``Wqkv`` split ``(three h d)``,
  GPT-NeoX style (non-interleaved) rotary over the full head dim, base ``rotary_emb_base``, additive key
  padding mask). It is written into the model folder only while PyLate loads it with
  ``trust_remote_code=True`` and deleted before the folder is kept: no remote code is committed.
* ``gemma_st`` / ``gemma_prompts`` — a tiny bidirectional ``Gemma3TextModel`` (EmbeddingGemma layout:
  sliding + full layers, GQA, q/k norms, ``query_pre_attn_scalar``) in a sentence-transformers folder
  Transformer → Pooling → Dense(32→64, no bias) → Dense(64→32, no bias) → Normalize with ``prompts``; the
  tokenizer has no mask token so PyLate pads and expands with EOS. ``gemma_prompts`` encodes queries with
  ``prompt_name="query"`` and documents with ``prompt_name="document"``; ``gemma_noprompt`` encodes without
  prompts (expansion tokens with fully masked sliding windows).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_TMP_MODULES = tempfile.mkdtemp(prefix="latte_hf_modules_")
os.environ["HF_MODULES_CACHE"] = _TMP_MODULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file as pt_save_file  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers import models as st_models  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3TextConfig,
    Gemma3TextModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
)

SEED = mf.SEED + 500
VOCAB = 400

# ---------------------------------------------------------------------------------------------------------
# Remote code stand-in (jinaai/xlm-roberta-flash-implementation, CPU path). Written to the model folder only
# while PyLate loads it.
# ---------------------------------------------------------------------------------------------------------

CONFIG_PY = '''
from transformers import PretrainedConfig


class XLMRobertaFlashConfig(PretrainedConfig):
    model_type = "xlm-roberta"

    def __init__(self, vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, hidden_act="gelu", max_position_embeddings=8194, type_vocab_size=1,
                 layer_norm_eps=1e-05, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 position_embedding_type="rotary", rotary_emb_base=10000.0, use_flash_attn=True,
                 matryoshka_dimensions=None, truncate_dim=None, **kwargs):
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.position_embedding_type = position_embedding_type
        self.rotary_emb_base = rotary_emb_base
        self.use_flash_attn = use_flash_attn
        self.matryoshka_dimensions = matryoshka_dimensions
        self.truncate_dim = truncate_dim
'''

MODELING_PY = '''
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from .configuration_xlm_roberta import XLMRobertaFlashConfig


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.absolute = c.position_embedding_type == "absolute"
        if self.absolute:
            self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.pad = c.pad_token_id

    def forward(self, ids):
        x = self.word_embeddings(ids)
        if self.absolute:
            m = ids.ne(self.pad).int()
            pos = (torch.cumsum(m, dim=1).type_as(m) * m).long() + self.pad
            x = x + self.position_embeddings(pos)
        tt = torch.zeros(ids.shape[1], dtype=torch.long, device=ids.device)
        return x + self.token_type_embeddings(tt)


class Rotary(nn.Module):
    def __init__(self, dim, base):
        super().__init__()
        self.dim = int(dim)
        self.base = float(base)

    def forward(self, x):  # x: (b, s, h, d), non-interleaved (rotate_half)
        s = x.shape[1]
        inv = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))
        t = torch.arange(s, dtype=torch.float32)
        freqs = torch.outer(t, inv)
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[None, :, None, :]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[None, :, None, :]
        x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2 : self.dim]
        rot = torch.cat([-x2, x1], -1)
        return torch.cat([x[..., : self.dim] * cos + rot * sin, x[..., self.dim :]], -1)


class MHA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h = c.num_attention_heads
        self.d = c.hidden_size // c.num_attention_heads
        self.Wqkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.rotary = Rotary(c.hidden_size / c.num_attention_heads, c.rotary_emb_base) \\
            if c.position_embedding_type == "rotary" else None

    def forward(self, x, key_padding_mask):
        b, s, _ = x.shape
        qkv = self.Wqkv(x).view(b, s, 3, self.h, self.d)
        q, k, v = qkv.unbind(2)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(self.d))
        pad = torch.full((b, s), -10000.0, dtype=scores.dtype)
        pad.masked_fill_(key_padding_mask, 0.0)
        scores = scores + pad[:, None, None, :]
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhts,bshd->bthd", attn, v).reshape(b, s, -1)
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.approx = "tanh" if c.hidden_act in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh") else "none"

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approx))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mixer = MHA(c)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = Mlp(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, mask):
        x = self.norm1(self.mixer(x, mask) + x)
        return self.norm2(self.mlp(x) + x)


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([Block(c) for _ in range(c.num_hidden_layers)])


class Pooler(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class XLMRobertaModel(PreTrainedModel):
    config_class = XLMRobertaFlashConfig
    base_model_prefix = "roberta"

    def __init__(self, config, add_pooling_layer=True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.post_init()

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.emb_ln(self.embeddings(input_ids))
        mask = attention_mask.bool()
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=x)
'''


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------


def train_bpe(texts, specials):
    tok = Tokenizer(models.BPE(unk_token=specials[-1] if "<unk>" in specials else None))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=specials, show_progress=False,
        limit_alphabet=120,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def build_xlmr_tokenizer(texts, out_dir: Path, markers: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False, limit_alphabet=120,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False)])
    if markers:
        # jina-colbert-v2 ships its markers in the vocabulary (no resize at load).
        tok.add_tokens([AddedToken("[QueryMarker]", normalized=False), AddedToken("[DocumentMarker]", normalized=False)])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0 </s>:0", pair="<s>:0 $A:0 </s>:0 </s>:0 $B:0 </s>:0",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
        cls_token="<s>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],
    )
    hf.save_pretrained(out_dir)
    return hf


def build_gemma_tokenizer(texts, out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, min_frequency=2, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        show_progress=False, limit_alphabet=120,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    # EmbeddingGemma's tokenizer adds <bos> and <eos>.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0 <eos>:0", pair="<bos>:0 $A:0 <eos>:0 $B:0 <eos>:0",
        special_tokens=[("<bos>", bos), ("<eos>", eos)],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=2048, model_input_names=["input_ids", "attention_mask"],
    )
    hf.save_pretrained(out_dir)
    return hf


# ---------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------


def xlmr_case(F: Path, M: Path, tmp: Path, texts) -> None:
    tok = build_xlmr_tokenizer(texts, tmp / "xlmr_tok", markers=False)
    mf.seed_everything(SEED + 1)
    cfg = XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=200, type_vocab_size=1, layer_norm_eps=1e-5, initializer_range=0.1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    base = tmp / "xlmr_plain"
    model = XLMRobertaModel(cfg, add_pooling_layer=True)
    mf.add_variance(model, SEED + 2)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    m = mf.new_colbert(SEED + 3, str(base), embedding_size=16, query_length=24, document_length=64)
    mf.save_and_check(m, M / "xlmr_pylate")
    mf.write_expectations(F, "xlmr_pylate", "models/xlmr_pylate", {}, True)


def jina_case(F: Path, M: Path, tmp: Path, texts, remote_code: str | None = None) -> None:
    tok = build_xlmr_tokenizer(texts, tmp / "jina_tok", markers=True)
    d = M / "jina_flash"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tok.save_pretrained(d)
    h, layers, inter = 32, 2, 64
    cfg = {
        "architectures": ["HF_ColBERT"],
        "auto_map": {
            "AutoConfig": "configuration_xlm_roberta.XLMRobertaFlashConfig",
            "AutoModel": "modeling_xlm_roberta.XLMRobertaModel",
        },
        "model_type": "xlm-roberta",
        "vocab_size": len(tok),
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": inter,
        "hidden_act": "gelu",
        "max_position_embeddings": 8194,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "position_embedding_type": "rotary",
        "rotary_emb_base": 20000.0,
        "use_flash_attn": True,
        "matryoshka_dimensions": [16, 12, 8],
        "truncate_dim": None,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    g = torch.Generator().manual_seed(SEED + 10)

    def rnd(*shape, scale=0.1):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    def norm(prefix, sd):
        sd[f"{prefix}.weight"] = (1.0 + rnd(h, scale=0.2)).contiguous()
        sd[f"{prefix}.bias"] = rnd(h)

    sd = {
        "roberta.embeddings.word_embeddings.weight": rnd(len(tok), h),
        "roberta.embeddings.token_type_embeddings.weight": rnd(1, h),
    }
    norm("roberta.emb_ln", sd)
    for i in range(layers):
        p = f"roberta.encoder.layers.{i}"
        sd[f"{p}.mixer.Wqkv.weight"] = rnd(3 * h, h)
        sd[f"{p}.mixer.Wqkv.bias"] = rnd(3 * h)
        sd[f"{p}.mixer.out_proj.weight"] = rnd(h, h)
        sd[f"{p}.mixer.out_proj.bias"] = rnd(h)
        norm(f"{p}.norm1", sd)
        sd[f"{p}.mlp.fc1.weight"] = rnd(inter, h)
        sd[f"{p}.mlp.fc1.bias"] = rnd(inter)
        sd[f"{p}.mlp.fc2.weight"] = rnd(h, inter)
        sd[f"{p}.mlp.fc2.bias"] = rnd(h)
        norm(f"{p}.norm2", sd)
    sd["roberta.pooler.dense.weight"] = rnd(h, h)
    sd["roberta.pooler.dense.bias"] = rnd(h)
    sd["linear.weight"] = rnd(16, h, scale=0.2)
    pt_save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "query_token_id": "[QueryMarker]",
        "doc_token_id": "[DocumentMarker]",
        "query_maxlen": 20,
        "doc_maxlen": 48,
        "attend_to_mask_tokens": True,
        "dim": 16,
    }
    (d / "artifact.metadata").write_text(json.dumps(meta, indent=4) + "\n")
    written = []
    if remote_code is not None:
        for src in sorted(Path(remote_code).glob("*.py")):
            shutil.copy(src, d / src.name)
            written.append(src.name)
        notes = ("Remote code: the XLMRobertaFlash files given with --jina-remote-code (CPU path, use_flash_attn "
                 "off), present only while generating (not committed); see README for which copies were used.")
    else:
        print("jina_flash: no --jina-remote-code given, using the minimal stand-in", file=sys.stderr)
        (d / "configuration_xlm_roberta.py").write_text(CONFIG_PY)
        (d / "modeling_xlm_roberta.py").write_text(MODELING_PY)
        written = ["configuration_xlm_roberta.py", "modeling_xlm_roberta.py"]
        notes = ("Remote code: a minimal re-implementation of jinaai/xlm-roberta-flash-implementation's CPU "
                 "path, present only while generating (not committed).")
    try:
        mf.write_expectations(F, "jina_flash", "models/jina_flash", {"trust_remote_code": True}, True, notes=notes)
    finally:
        for f in written:
            (d / f).unlink(missing_ok=True)
        shutil.rmtree(d / "__pycache__", ignore_errors=True)


def gemma_case(F: Path, M: Path, tmp: Path, texts) -> None:
    tok = build_gemma_tokenizer(texts, tmp / "gemma_tok")
    mf.seed_everything(SEED + 20)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=12, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        max_position_embeddings=2048, use_bidirectional_attention=True, initializer_range=0.1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
    )
    base = tmp / "gemma_plain"
    model = Gemma3TextModel(cfg)
    mf.add_variance(model, SEED + 21)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    mf.seed_everything(SEED + 22)
    st = SentenceTransformer(
        modules=[
            st_models.Transformer(str(base)),
            st_models.Pooling(32, pooling_mode="mean"),
            st_models.Dense(32, 64, bias=False, activation_function=nn.Identity()),
            st_models.Dense(64, 32, bias=False, activation_function=nn.Identity()),
            st_models.Normalize(),
        ],
        prompts={"query": "task: search result | query: ", "document": "title: none | text: "},
        device="cpu",
    )
    st.save(str(M / "gemma_st"), create_model_card=False)
    mf.write_expectations(F, "gemma_st", "models/gemma_st", {}, False,
                          notes="PyLate appends '[Q] '/'[D] ' with random embedding rows: ids, settings, "
                                "modules and shapes only.")
    kw = {"query_prefix": "<unk>", "document_prefix": "<pad>", "query_length": 20, "document_length": 40}
    mf.write_expectations(F, "gemma_prompts", "models/gemma_st", kw, True,
                          query_encode_kwargs={"prompt_name": "query"},
                          doc_encode_kwargs={"prompt_name": "document"})
    # Without prompts, short queries leave expansion tokens whose sliding window (|i - j| < 2 here) holds
    # no attended key: SDPA gives those rows a zero attention output (eager would not).
    mf.write_expectations(F, "gemma_noprompt", "models/gemma_st", kw, True)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jina-remote-code", help="folder with the real jinaai/xlm-roberta-flash-implementation files")
    ap.add_argument("--extra-sys-path", action="append", default=[],
                    help="folder to put on sys.path (e.g. a `pip install --target` folder holding einops)")
    ap.add_argument("--only", choices=["xlmr_pylate", "jina_flash", "gemma"], action="append",
                    help="regenerate only these cases (default: all)")
    args = ap.parse_args()
    for extra in args.extra_sys_path:
        sys.path.insert(0, extra)
    only = set(args.only or ["xlmr_pylate", "jina_flash", "gemma"])
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    F = mf.DEFAULT_OUT
    M = F / "models"
    texts = mf.corpus_texts(mf.DEFAULT_CORPUS)
    tmp = Path(tempfile.mkdtemp(prefix="latte_backbones_"))
    try:
        if "xlmr_pylate" in only:
            xlmr_case(F, M, tmp, texts)
        if "jina_flash" in only:
            jina_case(F, M, tmp, texts, args.jina_remote_code)
        if "gemma" in only:
            gemma_case(F, M, tmp, texts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(_TMP_MODULES, ignore_errors=True)


if __name__ == "__main__":
    main()
