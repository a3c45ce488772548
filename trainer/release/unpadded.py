"""The BERT encoder as an unpadded graph: every token-wise layer runs on the batch's real tokens only.

A batch is padded to its longest input, and a padded graph runs every weight multiplication (query, key,
value, attention output, both feed-forward layers: ~99 % of MiniLM's FLOPs on short inputs) on the padding
too; a batch of 32 random short sentences is ~25 % padding, paragraphs ~40 %. This graph gathers the real
tokens once (``NonZero`` on the attention mask), runs the embeddings and every weight multiplication on
them, and lays them out padded only for the attention products, which need it (ONNX Runtime's CPU kernels
have no variable-length attention). That layout is one ``Gather`` each for query, key and value, straight
from the rows of the QKV product into [batch, heads, sequence, head size], and one back for the context:
written as scatter, split and transposes it was 6 % slower on MiniLM (ONNX Runtime 1.32, 2 threads). It
takes and returns what the padded graph does (input_ids, attention_mask -> unit vectors), in standard ONNX
operators only, so any ONNX Runtime build and execution provider can load it; the export checks it against
the torch encoder (cosine ≥ 0.9999).
"""

import math
from typing import cast

import torch
from torch import nn
from transformers import BertModel
from transformers.models.bert.modeling_bert import BertLayer

from trainer.encoder import SentenceEncoder


def unpadding_refusal(encoder: SentenceEncoder) -> str | None:
    """Why ``encoder`` can't be exported unpadded (None: it can): only a plain SentenceEncoder around a BERT with
    absolute positions is rewritten; anything else keeps the padded graph."""
    if type(encoder) is not SentenceEncoder:
        return f"{type(encoder).__name__} has a forward of its own, which this rewrite would not keep"
    transformer = encoder.transformer
    if not isinstance(transformer, BertModel):
        return f"{type(transformer).__name__} is not a BertModel"
    config = transformer.config
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r} is not 'absolute'"
    if config.is_decoder or config.add_cross_attention:
        return "a decoder or cross-attention BERT is not a sentence encoder"
    return None


class _Layer(nn.Module):
    """One BERT layer's weights, query, key and value as one [H, 3H] product (one pass over the tokens)."""

    def __init__(self, layer: BertLayer) -> None:
        super().__init__()
        own = layer.attention.self
        self.qkv = nn.Linear(own.query.in_features, 3 * own.query.out_features)
        self.qkv.weight.data = torch.cat([own.query.weight, own.key.weight, own.value.weight]).detach().clone()
        self.qkv.bias.data = torch.cat([own.query.bias, own.key.bias, own.value.bias]).detach().clone()
        self.attention_output: nn.Linear = layer.attention.output.dense
        self.attention_norm: nn.LayerNorm = layer.attention.output.LayerNorm
        self.intermediate: nn.Linear = layer.intermediate.dense
        self.activation: nn.Module = layer.intermediate.intermediate_act_fn
        self.output: nn.Linear = layer.output.dense
        self.output_norm: nn.LayerNorm = layer.output.LayerNorm


class UnpaddedBert(nn.Module):
    """``encoder`` (a BERT SentenceEncoder) computing on real tokens only; the same maths and weights.

    The real tokens are rows ``[T, H]`` (T: real tokens of the batch); each linear layer is written as a MatMul
    and an Add (``_linear``): ONNX Runtime fuses them into one Gemm when it loads the graph, and INT8 dynamic
    quantisation still finds the MatMul (it leaves a Gemm in the file alone)."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        super().__init__()
        bert = encoder.transformer
        refusal = unpadding_refusal(encoder)
        if refusal is not None:
            raise ValueError(f"can't unpad this encoder: {refusal}")
        assert isinstance(bert, BertModel)
        embeddings = bert.embeddings
        self.word_embeddings: nn.Embedding = embeddings.word_embeddings
        self.position_embeddings: nn.Embedding = embeddings.position_embeddings
        self.token_type_embeddings: nn.Embedding = embeddings.token_type_embeddings
        self.embedding_norm: nn.LayerNorm = embeddings.LayerNorm
        self.layers = nn.ModuleList(_Layer(cast(BertLayer, layer)) for layer in bert.encoder.layer)
        self.heads = int(bert.config.num_attention_heads)
        self.head_size = int(bert.config.hidden_size) // self.heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        heads, head_size = self.heads, self.head_size
        mask = attention_mask.reshape(-1)
        real = torch.nonzero(mask).squeeze(1)  # flat [B*S] positions of the real tokens
        qkv_rows, context_rows = _attention_rows(mask, real, batch, length, heads)
        states = self._embed(input_ids.reshape(-1).index_select(0, real), real % length)
        bias = (1.0 - attention_mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
        for layer in self.layers:
            assert isinstance(layer, _Layer)
            # [T, 3H] as [T * 3 * heads, head_size] rows: a token's query heads, then its key and value heads.
            rows = _linear(layer.qkv, states).reshape(-1, head_size)
            query, key, value = (rows.index_select(0, each).view(batch, heads, length, head_size) for each in qkv_rows)
            scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(head_size) + bias
            context = torch.matmul(scores.softmax(dim=-1), value).reshape(-1, head_size)
            context = context.index_select(0, context_rows).view(-1, heads * head_size)
            attended = layer.attention_norm(_linear(layer.attention_output, context) + states)
            inner = layer.activation(_linear(layer.intermediate, attended))
            states = layer.output_norm(_linear(layer.output, inner) + attended)
        # Mean pooling: padding rows are zeros once scattered back, so a sum over the length is over real tokens.
        summed = self._scatter(states, real, batch * length).view(batch, length, -1).sum(dim=1)
        pooled = summed / attention_mask.sum(dim=1, keepdim=True).to(states.dtype).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=1)

    def _embed(self, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[T, H] embeddings of the real tokens: word + position + token type 0, layer-normed (BERT's)."""
        summed = (
            self.word_embeddings(token_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        )
        normed: torch.Tensor = self.embedding_norm(summed)
        return normed

    @staticmethod
    def _scatter(rows: torch.Tensor, real: torch.Tensor, padded_rows: int) -> torch.Tensor:
        """``rows`` [T, C] at positions ``real`` of a zero [B*S, C] tensor."""
        zeros = torch.zeros(padded_rows, rows.shape[-1], dtype=rows.dtype)
        return zeros.index_put((real,), rows)


def _attention_rows(
    mask: torch.Tensor, real: torch.Tensor, batch: int, length: int, heads: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Where the attention layout's rows come from and go back to, computed once per batch.

    - Query, key and value rows, [B * heads * S] each: for each padded position (b, s) and head n, the row of
      the real token's query (key, value) head n in the QKV product's [T * 3 * heads, head_size] rows. A
      padding position takes token 0's rows: any finite values do, as the attention bias masks padding keys
      and padding queries are never read back.
    - Context rows [T * heads]: for each real token and head, its row in the context's [B * heads * S,
      head_size] rows; gathered, they are the token's [H] context, heads in order.
    """
    token = ((torch.cumsum(mask, 0) - 1).clamp(min=0) * mask).view(batch, 1, length)  # padding -> token 0
    head = torch.arange(heads).view(1, heads, 1)
    query_rows = (token * (3 * heads) + head).reshape(-1)
    sample, position = real // length, real % length
    context_rows = (sample.view(-1, 1) * heads + head.view(1, heads)) * length + position.view(-1, 1)
    return [query_rows, query_rows + heads, query_rows + 2 * heads], context_rows.reshape(-1)


def _linear(layer: nn.Linear, rows: torch.Tensor) -> torch.Tensor:
    """``layer`` on ``rows`` [T, K], traced as a MatMul and an Add (nn.Linear on 2-D rows traces to a Gemm)."""
    return torch.matmul(rows, layer.weight.t()) + layer.bias
