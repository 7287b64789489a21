"""all-MiniLM-L6-v2 run in plain numpy: a 6-layer BERT encoder, mean pooling, L2 norm.

Why numpy and not sentence-transformers: the model package ships the weights as
safetensors and the tokenizer as tokenizer.json, which `safetensors` and `tokenizers`
read without torch. On this project's 2-core machines the numpy encoder embeds about
as fast as sentence-transformers on torch (docs/local-models.md has the figures) and
installs in seconds instead of pulling about 1.5 GB of torch and transformers.

The arithmetic follows the BERT architecture the model was trained with (post-norm
layers, exact erf GELU, padding masked out of attention and out of the mean), and
truncates at the 256 tokens sentence-transformers uses for this model, so vectors
agree with sentence-transformers' to float32 rounding (tests/core hold a reference).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

MAX_TOKENS = 256   # sentence_bert_config.json max_seq_length; tokenizer.json says 128 but is overridden there
_LN_EPS = 1e-12
_GELU_ROWS = 128   # 128 x 1536 float32 = 768 KB per temporary


class MiniLM:
    """Weights and tokenizer of one model folder; `encode` is safe to call from many threads."""

    def __init__(self, folder: Path):
        # These two come with the optional `embed` extra; router.core must import without it.
        from safetensors.numpy import load_file  # deferred: optional dependency (the embed extra)
        from tokenizers import Tokenizer  # deferred: optional dependency (the embed extra)

        config = json.loads((folder / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.dim = int(config["hidden_size"])
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{folder}: not a BERT encoder this module can run ({config.get('hidden_act')})")

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=MAX_TOKENS)

        w = load_file(str(folder / "model.safetensors"))
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.blocks = [self._block(w, f"encoder.layer.{i}.") for i in range(self.layers)]

    @staticmethod
    def _block(w: dict[str, np.ndarray], p: str) -> dict[str, np.ndarray]:
        # Query, key and value in one matrix: one large matmul instead of three small ones.
        att = p + "attention.self."
        qkv = np.concatenate([w[att + n + ".weight"] for n in ("query", "key", "value")], axis=0)
        qkv_b = np.concatenate([w[att + n + ".bias"] for n in ("query", "key", "value")])
        return {
            "qkv": np.ascontiguousarray(qkv.T), "qkv_b": qkv_b,
            "out": np.ascontiguousarray(w[p + "attention.output.dense.weight"].T),
            "out_b": w[p + "attention.output.dense.bias"],
            "ln1": w[p + "attention.output.LayerNorm.weight"], "ln1_b": w[p + "attention.output.LayerNorm.bias"],
            "up": np.ascontiguousarray(w[p + "intermediate.dense.weight"].T), "up_b": w[p + "intermediate.dense.bias"],
            "down": np.ascontiguousarray(w[p + "output.dense.weight"].T), "down_b": w[p + "output.dense.bias"],
            "ln2": w[p + "output.LayerNorm.weight"], "ln2_b": w[p + "output.LayerNorm.bias"],
        }

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """(len(texts), dim) float32, unit rows. Texts are grouped by token length so little is padded."""
        encodings = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(encodings), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(encodings[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.float32)
            for row, i in enumerate(chunk):
                n = len(encodings[i].ids)
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1.0
            out[chunk] = self._forward(ids, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, width = ids.shape
        heads, head_dim = self.heads, self.dim // self.heads
        # Dense layers act on (batch * width, dim) rows: numpy runs a 2-D matmul as one BLAS call
        # but loops over the first axis of a 3-D one (about 20x slower here).
        x = (self.word[ids] + self.position[:width] + self.token_type0).reshape(batch * width, self.dim)
        x = _layer_norm(x, *self.ln0)
        # Padding gets a large negative score, so exp() makes its attention weight exactly 0.
        pad_bias = ((1.0 - mask) * np.float32(-1e30))[:, None, None, :]
        scale = np.float32(1.0 / math.sqrt(head_dim))
        for b in self.blocks:
            qkv = (x @ b["qkv"] + b["qkv_b"]).reshape(batch, width, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + pad_bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * width, self.dim)
            x = _layer_norm(x + context @ b["out"] + b["out_b"], b["ln1"], b["ln1_b"])
            hidden = _gelu(x @ b["up"] + b["up_b"])
            x = _layer_norm(x + hidden @ b["down"] + b["down_b"], b["ln2"], b["ln2_b"])
        x = x.reshape(batch, width, self.dim)
        pooled = (x * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(_LN_EPS)) * weight + bias


def _gelu(hidden: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, in place: gelu(h) = max(h, 0) - |h|/2 * erfc(|h|/sqrt 2).

    numpy has no erf; erfc comes from Abramowitz & Stegun 7.1.26 (error below 1.5e-7,
    under float32's resolution for these activations). This array is the largest of
    the forward pass: it is done in blocks of rows that stay in the CPU cache.
    """
    for start in range(0, hidden.shape[0], _GELU_ROWS):
        _gelu_block(hidden[start:start + _GELU_ROWS])
    return hidden


def _gelu_block(h: np.ndarray) -> None:
    z = np.abs(h)
    z *= np.float32(1.0 / math.sqrt(2.0))
    t = z * np.float32(0.3275911)
    t += 1.0
    np.reciprocal(t, out=t)
    poly = t * np.float32(1.061405429)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += np.float32(c)
        poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z                      # erfc(|h| / sqrt 2)
    np.abs(h, out=z)
    z *= np.float32(0.5)
    poly *= z
    np.maximum(h, 0.0, out=h)
    h -= poly
