"""Where the continuous decoder keeps its running KV cache: grown per step (`GrowingRows`, the CPU default)
or preallocated once (`KVSlab`), so that on CUDA one decode step can be a captured CUDA graph.

Letters: R rows running, R_b the bucket of rows a step computes (R rounded up to a power of two, at most
R_cap = max_rows), H_kv key/value heads, T columns in use, T_cap columns allocated, hd head width, V vocabulary.

Both stores keep rows left-padded: every row's newest position is the same column, padded columns are
masked, every row has its own position ids. A decode step on the CPU is bound by its arithmetic; on a
GPU at small batch it is bound by launching several hundred small kernels (measured on an H200: ~22 ms
a token whether the LLM has 135M or 7B parameters, `../shared/GPU.md`), which a CUDA graph replays as
one launch. A graph needs every tensor it touches at a fixed address and shape, hence the slab:
(R_cap, H_kv, T_cap, hd) per layer, one graph per row bucket R_b (a step of 3 rows runs the graph of
4; the extra rows compute garbage nobody reads), and the column a step writes given to the graph as a
tensor. The attention then reads T_cap columns instead of T: cheap next to the weights at the batch sizes
a graph helps (a 7B-shaped model reads 13.5 GB of weights and 0.5 MB of KV per row and column).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import Cache

from service.models.prefix import KVPrefix

log = logging.getLogger(__name__)


class GrowingRows:
    """Tensors of exactly the running rows and columns: a step appends a column, a join stacks rows,
    a leave drops rows and columns nobody attends to any more. Least arithmetic, so the CPU default."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._keys: list[torch.Tensor] = []  # per layer (R, H_kv, T, hd)
        self._values: list[torch.Tensor] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=llm.device)  # (R, T)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=llm.device)  # (R,)

    @property
    def rows(self) -> int:
        return len(self._mask)

    def join(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
             next_pos: torch.Tensor) -> None:
        """Rows prefilled together: keys/values per layer (r, H_kv, n, hd), mask (r, n), next positions (r,)."""
        if not self.rows:
            self._keys, self._values, self._mask, self._next_pos = keys, values, mask.long(), next_pos
            return
        self._keys = [_stack_left_padded(a, b) for a, b in zip(self._keys, keys, strict=True)]
        self._values = [_stack_left_padded(a, b) for a, b in zip(self._values, values, strict=True)]
        self._mask = _stack_left_padded(self._mask, mask.long())  # (R, T)
        self._next_pos = torch.cat([self._next_pos, next_pos])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the rows flagged in (R,) bool; drop columns no kept row attends to."""
        self._mask, self._next_pos = self._mask[rows], self._next_pos[rows]
        self._keys = [k[rows] for k in self._keys]
        self._values = [v[rows] for v in self._values]
        if self._mask.numel():
            start = int((self._mask.sum(0) > 0).long().argmax())  # first column some row attends to
            if start:
                self._mask = self._mask[:, start:]
                self._keys = [k[:, :, start:] for k in self._keys]
                self._values = [v[:, :, start:] for v in self._values]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row: ids (R, 1) → next-token logits (R, V)."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(self.rows, 1)], dim=1)  # (R, T+1)
        cache = KVPrefix(self._keys, self._values).to_cache(self.llm.model.config)
        logits = self.llm.model(input_ids=ids, attention_mask=self._mask, position_ids=self._next_pos[:, None],
                                use_cache=True, logits_to_keep=1, **{self.llm.cache_arg: cache}).logits[:, -1].float()
        self._keys = [layer.keys for layer in cache.layers]  # (R, H_kv, T+1, hd)
        self._values = [layer.values for layer in cache.layers]
        self._next_pos = self._next_pos + 1
        return logits


class SlabCache(Cache):
    """The HF cache a slab step hands the model: each layer writes its new (R_b, H_kv, 1, hd) key/value at
    column `column` (a (1,) tensor, so a captured graph reads the column of each replay) and attends to all
    T_cap columns of its rows, the mask saying which count."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor) -> None:
        super().__init__(layers=[])
        self.slab_keys, self.slab_values, self.column = keys, values, column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.slab_keys[layer_idx], self.slab_values[layer_idx]  # (R_b, H_kv, T_cap, hd)
        keys.index_copy_(2, self.column, key_states.to(keys.dtype))
        values.index_copy_(2, self.column, value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slab_keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.slab_keys)


class KVSlab:
    """A preallocated cache of R_cap rows and T_cap columns (grown ×2 when a row needs more), rows kept
    in the decoder's order at the front, all rows writing the same column `t` each step. When `t` reaches
    T_cap or a joining row's prefill is longer than `t`, the used columns move (in place: captured graphs
    keep their addresses); only growth reallocates, and then the graphs are captured again."""

    def __init__(self, llm: Any, max_rows: int, columns: int = 512, graphs: bool = False) -> None:
        self.llm = llm
        self.max_rows = max_rows
        self.graphs = graphs and llm.device.type == "cuda"
        """Replay one CUDA graph per row bucket (CUDA only; elsewhere the same steps run eagerly)."""
        self._rows = 0
        self._t = 0  # the column the next step writes
        self.moves = 0
        """Times the running rows' columns moved (left when columns ran out, right for a longer joiner)."""
        device = llm.device
        self._ids = torch.zeros(max_rows, 1, dtype=torch.long, device=device)  # (R_cap, 1)
        self._pos = torch.zeros(max_rows, 1, dtype=torch.long, device=device)  # (R_cap, 1)
        self._column = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self._allocate(columns)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def columns(self) -> int:
        return self._valid.shape[1]

    def _allocate(self, columns: int) -> None:
        L, dtype, device = self.llm.layout, self.llm.model.dtype, self.llm.device
        shape = (self.max_rows, L.num_kv_heads, columns, L.head_dim)  # (R_cap, H_kv, T_cap, hd)
        # zeros, not empty: a masked column's value still meets a 0 weight, and 0 · NaN would be NaN
        self._keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L.num_layers)]
        self._values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(L.num_layers)]
        self._valid = torch.zeros(self.max_rows, columns, dtype=torch.bool, device=device)  # (R_cap, T_cap)
        size = sum(t.numel() * t.element_size() for t in self._keys + self._values)
        log.info("decode slab: %d rows x %d columns, %.0f MiB on %s (CMT_MAX_DECODE_ROWS, CMT_DECODE_SLAB_COLUMNS)",
                 self.max_rows, columns, size / 2**20, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self._pool = None

    def join(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
             next_pos: torch.Tensor) -> None:
        """Rows prefilled together: keys/values per layer (r, H_kv, n, hd), mask (r, n), next positions (r,)."""
        r, n = mask.shape
        if self._rows + r > self.max_rows:
            raise ValueError(f"{self._rows} + {r} rows exceed the slab's {self.max_rows}")
        self._make_room(n)
        rows, cols = slice(self._rows, self._rows + r), slice(self._t - n, self._t)
        for slab, new in zip(self._keys + self._values, keys + values, strict=True):
            slab[rows, :, cols] = new
        self._valid[rows] = False
        self._valid[rows, cols] = mask.bool()
        self._pos[rows, 0] = next_pos
        self._rows += r

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the rows flagged in (R,) bool, moved to the front in their order."""
        index = rows.nonzero().flatten().to(self._valid.device)  # (R',)
        kept = len(index)
        if not torch.equal(index.cpu(), torch.arange(kept)):  # rows move only when one before them left
            for slab in self._keys + self._values:
                slab[:kept] = slab[index]
            self._valid[:kept] = self._valid[index]
            self._pos[:kept] = self._pos[index]
        self._rows = kept
        if not kept:
            self._t = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row: ids (R, 1) → next-token logits (R, V)."""
        R = self._rows
        self._make_room(0)
        bucket = next(b for b in _buckets(self.max_rows) if b >= R)
        self._ids[:R] = ids
        self._ids[R:bucket] = 0  # rows of the bucket nobody runs: any token, at position 0
        self._pos[R:bucket] = 0
        self._column.fill_(self._t)
        self._valid[:bucket, self._t] = True
        logits = self._run(bucket)[:R].clone()  # (R, V): the graph's output buffer is overwritten next step
        self._pos[:R] += 1
        self._t += 1
        return logits

    def _make_room(self, n: int) -> None:
        """Make sure a row of n columns can join before column t and one step can write column t."""
        if n <= self._t < self.columns:
            return
        used = self._valid[: self._rows].any(dim=0).nonzero()
        span = self._t - int(used[0]) if self._rows and len(used) else 0  # columns the running rows attend to
        t = max(span, n)
        if t + 1 > self.columns:
            self._grow(t + 1)
        R = self._rows
        self.moves += bool(span)
        for slab in self._keys + self._values:
            cols = slab[:R].transpose(0, 2)  # (T_cap, H_kv, R, hd): the running rows, columns first
            cols[t - span : t] = cols[self._t - span : self._t].clone()
        valid = self._valid[:R].t()  # (T_cap, R)
        valid[t - span : t] = valid[self._t - span : self._t].clone()
        valid[: t - span] = False
        valid[t:] = False
        self._t = t

    def _grow(self, columns: int) -> None:
        """Reallocate with at least `columns` columns (×2 each time), keeping the used ones; drops the graphs."""
        new = max(columns, 2 * self.columns)
        log.info("decode slab grows from %d to %d columns", self.columns, new)
        old = self._keys + self._values + [self._valid]
        self._allocate(new)
        for slab, before in zip(self._keys + self._values + [self._valid], old, strict=True):
            slab.narrow(-1 if slab.dim() == 2 else 2, 0, before.shape[-1 if before.dim() == 2 else 2]).copy_(before)

    def _step(self, bucket: int) -> torch.Tensor:
        """The model on the first `bucket` rows at column t: logits (R_b, V). What a graph captures."""
        cache = SlabCache([k[:bucket] for k in self._keys], [v[:bucket] for v in self._values], self._column)
        # an additive mask, which eager and SDPA attention both take as is (0 = attend, the dtype's min = masked)
        dtype = self.llm.model.dtype
        valid = self._valid[:bucket, None, None, :]  # (R_b, 1, 1, T_cap)
        mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, torch.finfo(dtype).min)
        out = self.llm.model(input_ids=self._ids[:bucket], attention_mask=mask, position_ids=self._pos[:bucket],
                             use_cache=True, logits_to_keep=1, **{self.llm.cache_arg: cache})
        return out.logits[:, -1].float()

    def _run(self, bucket: int) -> torch.Tensor:
        if not self.graphs:
            return self._step(bucket)
        if bucket not in self._graphs:
            self._graphs[bucket] = self._capture(bucket)
        captured = self._graphs[bucket]
        if captured is None:  # capture failed once: this bucket runs eagerly
            return self._step(bucket)
        graph, logits = captured
        graph.replay()
        return logits

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """Warm up on a side stream (the step writes the same column as the real one, so it is idempotent),
        then capture. A model that cannot be captured keeps working eagerly, with a warning."""
        try:
            stream = torch.cuda.Stream(self.llm.device)
            stream.wait_stream(torch.cuda.current_stream(self.llm.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(bucket)
            torch.cuda.current_stream(self.llm.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(bucket)
            self._pool = graph.pool()
            return graph, logits
        except RuntimeError as error:
            log.warning("CUDA graph capture of a %d-row decode step failed, running it eagerly: %s", bucket, error)
            return None


def _buckets(max_rows: int) -> list[int]:
    """Row counts a step is computed at: powers of two below max_rows, then max_rows."""
    out = [1]
    while out[-1] * 2 < max_rows:
        out.append(out[-1] * 2)
    return sorted(set(out + [max_rows]))


def _stack_left_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then rows of b, each right-aligned in the longer one's columns with zeros in front (masked
    columns): (R, H_kv, t, hd) and (r, H_kv, t', hd) → (R+r, H_kv, T, hd), or masks (R, t), (r, t') → (R+r, T).
    One copy of each (padding then concatenating copies the running cache twice)."""
    col = 2 if a.dim() == 4 else 1
    T = max(a.shape[col], b.shape[col])
    out = a.new_zeros(a.shape[0] + b.shape[0], *a.shape[1:col], T, *a.shape[col + 1 :])
    out[: a.shape[0]].narrow(col, T - a.shape[col], a.shape[col]).copy_(a)
    out[a.shape[0] :].narrow(col, T - b.shape[col], b.shape[col]).copy_(b)
    return out
