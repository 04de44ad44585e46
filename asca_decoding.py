"""
KV-cached decoding for ASCA (sample.py, GPT.forward_cached): a tile's blocks are chosen once, at its first byte, as
the training forward chooses them (the selector's choose_row: that row only), gathered once, and each step runs one
SDPA over them and the tile's own bytes so far, with the gate bias as its additive mask. tests/test_decoding.py
compares every decoded byte's logits with the full forward's.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asca_selector import GATED


@dataclass
class TileState:
    """Decoding state of the tile in progress (LayerCache.tile): chosen once, at the tile's first byte."""
    b: int  # the tile
    keys: torch.Tensor  # (B, nh, m*S + S, hs): the m kept past blocks gathered once, then S slots for the
    vals: torch.Tensor  # tile's own bytes, which the steps fill in place (values likewise)
    mask: torch.Tensor  # (B, nh, m*S + S): logsigmoid(score) per kept block, -inf on a head's unused slots, 0 own
    start: int  # m*S: where the own block's slots begin
    summaries: tuple = None  # compressed branch: (keys, values) (B, nh, b, hs), the means of the b blocks before b
    #                          (selector='nsa': through the branch's own projections)


class CachedDecoding:
    """The decoding hooks of AdaptiveSparseCausalSelfAttention (gpt.CausalSelfAttention declares them): it mixes this
    class in, and provides S, selector, gate_rotated, compressed, nsa and the branches' parameters."""

    def gate_query(self, q, qr):
        return qr if self.gate_rotated or self.nsa else q  # NSA's choice reads q and k as attended

    def after_prefill(self, q, qr, lc):
        """After a prompt of L bytes, the tile holding position L needs its choice if it has begun: made
        from its first query, which only the prefill saw."""
        if self.selector.rule not in GATED + ("nsa",):
            raise ValueError(f"cached decoding supports selector='learned', 'local_gated' and 'nsa' only (this model: "
                             f"{self.selector.rule!r}); sample with --kv_cache=false")
        L, S = q.shape[2], self.S
        lc.tile = self.choose_tile(lc, L // S, self.gate_query(q, qr)[:, :, (L // S) * S]) if L % S else None

    def block_means(self, lc, b):
        """(B, nh, b, hs): the key summary (as the predictor reads and pools it) of each of the first b blocks in the
        cache. A block is complete once, so its summary is kept (lc.block_means) and each tile pools only the blocks
        that completed since the last: re-pooling the whole cache at every tile read all of it."""
        S = self.S
        keys = lc.k if self.gate_rotated else lc.k_raw
        B, H, _, hs = keys.shape
        have = 0 if lc.block_means is None else lc.block_means.shape[2]
        if have < b:
            new = self.selector.predictor.pool_keys(keys[:, :, have * S:b * S].reshape(B, H, b - have, S, hs))
            lc.block_means = new if have == 0 else torch.cat([lc.block_means, new], dim=2)
        return lc.block_means[:, :, :b] if b else keys.new_zeros(B, H, 0, hs)

    def choose_tile(self, lc, b, q_first):
        """Tile b's TileState, chosen as the training forward's selection would from the tile's first query
        q_first (B, nh, hs) and the b complete blocks before it (selector.choose_row: that row only; m the largest
        count over heads, a head that keeps fewer has -inf on the rest)."""
        S, sl = self.S, self.selector
        B, H, _, hs = lc.k.shape
        if self.nsa:  # compressed_block_probs' row b: the first query's attention over the compressed keys
            kb = lc.k[:, :, :b * S].float().reshape(B, H, b, S, hs).mean(3) @ sl.nsa_ck.float()[None]
            row = torch.softmax((q_first[:, :, None].float() @ kb.transpose(-1, -2))[:, :, 0] / math.sqrt(hs), dim=-1)
        else:
            kb = self.block_means(lc, b)  # (B, nh, b, hs): as the forward's
            row = sl.predictor.score(q_first[:, :, None], kb, torch.tensor([b], device=kb.device))[:, :, 0]  # (B,nh,b)
        blocks, n, bias = sl.choose_row(row, b)  # (B, nh, m), (B, nh), (B, nh, m)
        m = blocks.shape[-1]
        k_buf, v_buf = lc.k.new_empty(B, H, m * S + S, hs), lc.v.new_empty(B, H, m * S + S, hs)
        if m:
            bi = torch.arange(B, device=blocks.device)[:, None, None]
            hi = torch.arange(H, device=blocks.device)[None, :, None]
            for buf, src in ((k_buf, lc.k), (v_buf, lc.v)):  # whole blocks: (B, nh, m, S, hs) by block index
                buf[:, :, :m * S] = src[:, :, :b * S].reshape(B, H, b, S, hs)[bi, hi, blocks].reshape(B, H, m * S, hs)
        have = lc.len - b * S  # the tile's bytes already cached (a prefill that ended inside it)
        k_buf[:, :, m * S:m * S + have], v_buf[:, :, m * S:m * S + have] = lc.k[:, :, b * S:], lc.v[:, :, b * S:]
        mask = torch.cat([bias.repeat_interleave(S, dim=-1), bias.new_zeros(B, H, S)], dim=-1)
        summaries = None
        if (self.compressed or self.nsa) and b >= 1:  # the branch's summaries of the b blocks before the tile
            summaries = tuple(t[:, :, :b * S].reshape(B, H, b, S, hs).mean(dim=3) for t in (lc.k, lc.v))
            if self.nsa:  # attend_compressed's: through the branch's own key and value projections
                summaries = (summaries[0] @ sl.nsa_ck.to(lc.k.dtype)[None],
                             summaries[1] @ self.nsa_cv.to(lc.v.dtype)[None])
        return TileState(b, k_buf, v_buf, mask.to(lc.k.dtype), m * S, summaries)

    def attend_step(self, q, qr, lc, pos0):
        """One new query at pos0 over its tile's kept blocks (gathered once per tile) and its own block so
        far: one fused SDPA call with the gate bias as its additive mask."""
        if qr.shape[2] != 1:
            raise ValueError("ASCA decodes one byte per step after the prefill")
        S = self.S
        b = pos0 // S
        if lc.tile is None or lc.tile.b != b:
            if pos0 % S:
                raise RuntimeError(f"decoding state lost: position {pos0} is inside tile {b}, whose choice is unknown")
            lc.tile = self.choose_tile(lc, b, self.gate_query(q, qr)[:, :, 0])
        t = lc.tile
        n = t.start + pos0 + 1 - b * S
        t.keys[:, :, n - 1], t.vals[:, :, n - 1] = lc.k[:, :, pos0], lc.v[:, :, pos0]
        y = F.scaled_dot_product_attention(qr, t.keys[:, :, :n], t.vals[:, :, :n], attn_mask=t.mask[:, :, None, :n])
        y_cmp = F.scaled_dot_product_attention(qr, *t.summaries) if t.summaries is not None else torch.zeros_like(y)
        if self.nsa:  # nsa_branches' gated sum; the window (own and local_blocks nearest blocks) is contiguous
            w0 = max(0, b - self.selector.local) * S
            y_win = F.scaled_dot_product_attention(qr, lc.k[:, :, w0:pos0 + 1], lc.v[:, :, w0:pos0 + 1])
            g = torch.sigmoid(torch.einsum("bhtd,hkd->bhtk", qr, self.nsa_gate_w.to(qr.dtype))
                              + self.nsa_gate_b.to(qr.dtype)[None, :, None, :])  # (B, nh, 1, 3)
            return g[..., 0:1] * y + g[..., 1:2] * y_win + g[..., 2:3] * y_cmp
        if t.summaries is not None:  # the compressed branch over the tile's past block summaries
            y = y + self.compressed_gate(qr) * y_cmp
        return y
