"""
A synthetic associative-recall task where no fixed rule of blocks can win: can the learned choice find a far block
when the task demands it?

Each episode is one training window of T + 1 bytes (the loader aligns windows to episodes, meta.json "align"):
- filler: uniform random bytes from FILLER (unpredictable: 6 bits each);
- records: n_records bytes early in the episode (positions before T // 4), each one byte carrying a key and a value
  (RECORD0 + key * N_VALUES + value; distinct keys within an episode);
- queries: n_queries bytes later (from T // 2 on), each carrying the key of one of the episode's records
  (QUERY0 + key), at least min_distance after that record, and followed by its answer byte (ANSWER0 + value).
The one-step form (a record is one byte): a single attention step from the query to its record can answer, so a dense
model learns it on a CPU in minutes. With min_distance beyond the blocks every tile keeps (its own and the local
ones), the nearest-blocks rule cannot see the record: by construction it answers at chance.
Variant 'A' puts each query at a tile start (position b * S), where the block choice reads it; variant 'B' at random
positions, which tests the tile-shared decision.

The metric (answers()): at each key's first query the model predicts the next byte, the answer; answer accuracy
(argmax) and bits on the answer bytes, per bucket of query-to-record distance. Later queries of a key are trained on
but not scored: an earlier query's answer byte, perhaps within the nearest blocks, would tell them (a nearest-blocks
model scored 0.30 on all queries, against 0.125 for chance).
"""
import math

import numpy as np

FILLER = (32, 96)  # [lo, hi): filler bytes
QUERY0, N_KEYS = 96, 16  # query byte = QUERY0 + key
ANSWER0, N_VALUES = 112, 8  # answer byte = ANSWER0 + value
RECORD0 = 128  # record byte = RECORD0 + key * N_VALUES + value  (128 .. 255)
VARIANTS = ("A", "B")
DEFAULTS = dict(n_records=8, n_queries=32, min_distance=64, variant="A", tile=4)  # prepare_dataset.py's too


def check_spec(T, n_records, n_queries, min_distance, variant, tile):
    """None if episodes of T + 1 bytes with these settings can be made, else a one-line reason with a fix."""
    if variant not in VARIANTS:
        return f"variant={variant!r} must be one of {', '.join(VARIANTS)}"
    if not 1 <= n_records <= N_KEYS:
        return f"n_records={n_records} must be between 1 and {N_KEYS} (one record per key)"
    if n_queries < 1:
        return f"n_queries={n_queries} must be at least 1"
    if T < 64 or tile < 1 or T % tile:
        return f"T={T} must be at least 64 and a multiple of the tile size {tile}"
    rec_end, q_start = T // 4, T // 2
    if n_records > rec_end:
        return f"n_records={n_records} do not fit the first quarter of T={T} ({rec_end} positions): use fewer"
    if min_distance >= T - 1:
        return f"min_distance={min_distance} is beyond T={T}: use a distance below {T - 1}"
    room = max_queries(query_slots(T, variant, tile, q_start, rec_end, min_distance), variant, tile)
    if room < n_queries:
        return (f"only {room} query positions lie at least min_distance={min_distance} after the records "
                f"(T={T}, variant {variant}, each answer after its query): use fewer queries, a shorter distance or "
                f"a longer T")
    return None


def query_slots(T, variant, tile, q_start, rec_end, min_distance):
    """The positions a query may take: from T // 2 on, at least min_distance after the last record slot, leaving room
    for its answer byte (the window's last input is position T - 1); variant A: tile starts only."""
    lo = max(q_start, rec_end - 1 + min_distance)
    cand = range(lo, T - 1)
    return [p for p in cand if p % tile == 0] if variant == "A" else list(cand)


def max_queries(slots, variant, tile):
    """How many queries the slots hold: every slot where they are a tile apart (A, tile >= 2); else every other one
    (a query's answer takes the next position)."""
    return len(slots) if variant == "A" and tile >= 2 else (len(slots) + 1) // 2


def make_episodes(n_episodes, T, seed, n_records=8, n_queries=32, min_distance=64, variant="A", tile=4):
    """(n_episodes, T + 1) uint8 episodes, deterministic by seed. Records at distinct random positions in the first
    quarter, queries at distinct slots (query_slots), each asking a record at least min_distance before it, chosen
    among those far enough."""
    why = check_spec(T, n_records, n_queries, min_distance, variant, tile)
    if why:
        raise ValueError(why)
    rng = np.random.default_rng(seed)
    rec_end, q_start = T // 4, T // 2
    slots = np.array(query_slots(T, variant, tile, q_start, rec_end, min_distance))
    out = rng.integers(FILLER[0], FILLER[1], size=(n_episodes, T + 1), dtype=np.int64)
    for e in range(n_episodes):
        keys = rng.choice(N_KEYS, size=n_records, replace=False)
        values = rng.integers(0, N_VALUES, size=n_records)
        rpos = np.sort(rng.choice(rec_end, size=n_records, replace=False))
        out[e, rpos] = RECORD0 + keys * N_VALUES + values
        # queries take distinct slots, never adjacent (a query's answer byte must not be overwritten)
        if variant == "A" and tile >= 2:
            qpos = rng.choice(slots, size=n_queries, replace=False)
        else:  # consecutive slots: n sorted picks among len - n + 1, spread by one each (uniform, gaps >= 2)
            picks = np.sort(rng.choice(len(slots) - n_queries + 1, size=n_queries, replace=False))
            qpos = slots[0] + picks + np.arange(n_queries)
        for p in (int(p) for p in qpos):
            far = np.nonzero(rpos <= p - min_distance)[0]
            r = rng.choice(far)
            out[e, p] = QUERY0 + keys[r]
            out[e, p + 1] = ANSWER0 + values[r]
    return out.astype(np.uint8)


def answers(x):
    """For windows x (B, T) of episodes: the positions of the first query byte of each key whose record lies in the
    window, as (batch index, query position, answer byte, query-to-record distance) arrays. A later query of a key
    already asked is left out: its answer could be copied from the earlier query's answer byte, which may lie within
    the nearest blocks. The answer is read from the record, so the metric needs nothing but the bytes."""
    x = np.asarray(x)
    bi, ti, ans, dist = [], [], [], []
    for b in range(x.shape[0]):
        row = x[b]
        recs, asked = {}, set()
        for t, v in enumerate(row):
            v = int(v)
            if v >= RECORD0:
                recs[(v - RECORD0) // N_VALUES] = (t, (v - RECORD0) % N_VALUES)
            elif QUERY0 <= v < QUERY0 + N_KEYS and (v - QUERY0) in recs and (v - QUERY0) not in asked:
                asked.add(v - QUERY0)
                r, value = recs[v - QUERY0]
                bi.append(b), ti.append(t), ans.append(ANSWER0 + value), dist.append(t - r)
    return np.array(bi, dtype=np.int64), np.array(ti, dtype=np.int64), np.array(ans, dtype=np.int64), \
        np.array(dist, dtype=np.int64)


def bucket_edges(T, n=3):
    """Distance buckets over (0, T): n equal ranges."""
    return [int(round(i * T / n)) for i in range(n + 1)]


def summarize(correct, bits, dist, T):
    """{'answers', 'answer_acc', 'answer_bpc', 'buckets': [{lo, hi, answers, answer_acc, answer_bpc}]}."""
    correct, bits, dist = (np.asarray(a, dtype=np.float64) for a in (correct, bits, dist))
    edges = bucket_edges(T)
    out = {"answers": int(len(correct)), "answer_acc": float(correct.mean()) if len(correct) else None,
           "answer_bpc": float(bits.mean()) if len(bits) else None, "buckets": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (dist >= lo) & (dist < hi)
        out["buckets"].append({"lo": lo, "hi": hi, "answers": int(m.sum()),
                               "answer_acc": float(correct[m].mean()) if m.any() else None,
                               "answer_bpc": float(bits[m].mean()) if m.any() else None})
    return out


def chance_bits():
    """Bits per answer of a model that knows only that an answer is one of N_VALUES values."""
    return math.log2(N_VALUES)


def task_oracle_scores(idx, S, nb):
    """(B, nb, nb) float: 1 on the block holding the record that tile b's first byte (position b * S) asks for, if
    that byte is a query, else 0. Reads only positions <= b * S: causal like every selector. Analysis only (the
    'task_oracle' selector): it shows the kernel and the budget can solve the task."""
    import torch
    B, T = idx.shape
    scores = torch.zeros(B, nb, nb)
    x = idx.detach().cpu().numpy()
    for b in range(B):
        latest = {}
        row = x[b]
        for t in range(min(T, nb * S)):
            v = int(row[t])
            if t % S == 0 and QUERY0 <= v < QUERY0 + N_KEYS and (v - QUERY0) in latest:
                scores[b, t // S, latest[v - QUERY0] // S] = 1.0
            if v >= RECORD0:
                latest[(v - RECORD0) // N_VALUES] = t
    return scores
