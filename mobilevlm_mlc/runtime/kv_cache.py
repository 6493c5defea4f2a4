"""The library's paged KV cache, seen from the driver: sequences in it, pages free, and the bracket
around each forward call (`begin_forward` / `end_forward`, as MLC's engine does)."""

from __future__ import annotations

from mobilevlm_mlc.model_defs.config import KV_PAGE_SIZE

from .backend import Backend


def pages(tokens: int) -> int:
    """KV cache pages that `tokens` tokens of one sequence occupy."""
    return -(-tokens // KV_PAGE_SIZE)


class PagedKVCache:
    """One cache made by the library's `create_tir_paged_kv_cache`; `handle` is what its entry points
    take and give back."""

    def __init__(self, create, backend: Backend, max_sequences: int, max_tokens: int, prefill_chunk_size: int):
        self.backend = backend
        self.handle = create(
            backend.shape(max_sequences),
            backend.shape(max_tokens),
            backend.shape(prefill_chunk_size),
            backend.shape(KV_PAGE_SIZE),
            backend.shape(0),  # 0: no sliding window
        )
        self._next_seq_id = 0

    def free_tokens(self) -> int:
        return int(self.backend.builtin("attention_kv_cache_get_num_available_pages")(self.handle)) * KV_PAGE_SIZE

    def add_sequence(self) -> int:
        seq_id, self._next_seq_id = self._next_seq_id, self._next_seq_id + 1
        self.backend.builtin("kv_state_add_sequence")(self.handle, seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self.backend.builtin("kv_state_remove_sequence")(self.handle, seq_id)

    def fork_sequence(self, parent: int, position: int) -> int:
        """A new sequence holding `parent`'s first `position` tokens: whole pages are shared, not copied."""
        seq_id, self._next_seq_id = self._next_seq_id, self._next_seq_id + 1
        self.backend.builtin("kv_state_fork_sequence")(self.handle, parent, seq_id, position)
        return seq_id

    def begin_forward(self, seq_ids: list[int], lengths: list[int]) -> None:
        """The next call appends `lengths[i]` tokens to sequence `seq_ids[i]`, in that order."""
        self.backend.builtin("kv_state_begin_forward")(
            self.handle, self.backend.shape(*seq_ids), self.backend.shape(*lengths)
        )

    def end_forward(self) -> None:
        self.backend.builtin("kv_state_end_forward")(self.handle)
