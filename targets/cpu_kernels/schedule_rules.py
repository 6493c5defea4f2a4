"""Schedules for CPUs (x86-64 and AArch64 through LLVM), as dlight rules.

TVM ships no CPU matmul schedule: left alone, a decode step runs every weight through scalar loops on
one core. These rules give every kernel threads and SIMD lanes:

- `QuantizedGEMV`: one token times an NK64 4-bit weight (decode). A SIMD vector holds 16 output rows;
  each task takes one 64-row tile and streams its packed words once (AND, convert, two FMAs per 16
  weights, no shifts); four vector accumulators hide the FMA latency.
- `Matmul`: several tokens times any weight (prefill, the vision tower, the projector, attention
  scores). Each task takes a block of output columns, dequantizes (or repacks) that block of the weight
  once into a k-major tile, then runs a register-blocked kernel over the rows (padded to its multiple):
  `rows x column-vectors` accumulators, one weight vector load feeding `rows` FMAs.
- `RowReduction`: norms and softmax, rows in parallel, each row's reductions in SIMD lanes.
  `Elementwise`: parallel outer loops, vectorized inner one. `ParallelLoops`: any other single loop nest
  (the KV cache's RoPE).

Sizes come from `CpuKernelConfig`, which each CPU target picks for its vector registers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars

from mobilevlm_mlc.model_defs.quantization import DEQUANTIZE_BLOCK, ROW_TILE

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuKernelConfig:
    """Register blocking of the matmul kernels: `lanes` fp32 per vector (16 on AVX-512, 4 on NEON;
    wider loops are split by LLVM), GEMV row blocks per task, GEMM rows x column-vectors per kernel."""

    lanes: int = 16
    gemv_row_vectors: int = 4  # 4 accumulators of 16 rows = one NK64 tile per task: hides FMA latency, one stream
    gemm_rows: int = 6
    gemm_column_vectors: int = 2  # 6 x 2 x 16 = 12 AVX-512 accumulators
    k_unroll: int = 32  # one quantization group: its 8 rescaled scales serve 4 words
    # software prefetch: decode attention asks for each head's next KV page, the skinny int8 matmul for
    # the weight groups ahead (a void `llvm.prefetch` call, which TVM 0.27's AttachGlobalSymbol cannot
    # rewrite under a system-lib prefix: off for the Android `.tar`)
    prefetch: bool = True


_REFUSALS = (s_tir.ScheduleError, tvm.error.InternalError)  # a schedule primitive declining a kernel


class _CpuRule(dl.ScheduleRule):
    """A rule that schedules `sch` in place and returns True, or declines (False). A schedule
    primitive refusing a kernel declines too: the next rule (or none) takes it."""

    def __init__(self, config: CpuKernelConfig):
        self.config = config

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        try:
            return sch if self.schedule(sch) else None
        except _REFUSALS as err:
            _log.debug(
                "%s declined the kernel of %s: %s",
                type(self).__name__,
                [p.name for p in func.params],
                str(err).splitlines()[-1][:300],
            )
            return None

    def schedule(self, sch: s_tir.Schedule) -> bool:
        raise NotImplementedError


def _matmul_blocks(sch: s_tir.Schedule):
    """(producers, the matmul block, epilogue blocks) of a function with one reduction, or None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [i for i, info in enumerate(infos) if info.is_reduction()]
    if len(reductions) != 1:
        return None
    index = reductions[0]
    main = infos[index]
    kinds = main.dom_kind()
    if not kinds.endswith("SR") or set(kinds[:-1]) != {"S"}:
        return None  # C[..., n] = sum_k A[..., k] * B(n, k)
    if not all(info.is_injective() for info in infos[:index] + infos[index + 1 :]):
        return None
    return infos[:index], main, infos[index + 1 :]


def _is_nk64_weight(sch: s_tir.Schedule, producers) -> bool:
    """The matmul's weight is dequantized from the NK64 layout ([n/64, k/8, 64] words)."""
    for info in producers:
        if sch.get(info.block_rv).name_hint.startswith(DEQUANTIZE_BLOCK):
            return any(
                len(r.source.shape) == 3 and int(r.source.shape[2]) == ROW_TILE for r in sch.get(info.block_rv).reads
            )
    return False


def _static_rows(sch: s_tir.Schedule, main) -> int | None:
    """Product of the matmul's leading spatial extents when static (the token count), else None."""
    total = 1
    for loop in sch.get_loops(main.block_rv)[:-2]:
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm):
            return None
        total *= int(extent)
    return total


def _vectorize(sch: s_tir.Schedule, loop, lanes: int) -> None:
    """`loop` split into SIMD vectors of `lanes`, when its extent divides into them."""
    extent = sch.get(loop).extent
    if isinstance(extent, tirx.IntImm) and int(extent) % lanes == 0:
        _, vec = sch.split(loop, [None, lanes])
        sch.vectorize(vec)


def _parallel_vectorized(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Outer loops fused and parallel; the innermost vectorized when it divides into vectors."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize(sch, loops[-1], lanes)


def _inline_epilogue(sch: s_tir.Schedule, epilogue, result, lanes: int) -> None:
    """Fold the elementwise tail (bias, residual add, cast, activation) into `result`, the block that
    writes the matmul's result: inner blocks into their readers (quick-GELU reads the bias add twice),
    then the last one into that writer when it has the result's shape. A last block that broadcasts
    the result over a larger tensor (LDP's squeeze-excitation gate) stays a loop nest of its own,
    parallel and vectorized."""
    for info in epilogue[:-1]:
        sch.compute_inline(info.block_rv)
    if not epilogue:
        return
    last = epilogue[-1].block_rv
    if list(sch.get(last).writes[0].source.shape) == list(sch.get(result).writes[0].source.shape):
        sch.reverse_compute_inline(last)
    else:
        _parallel_vectorized(sch, last, lanes)


def _register_kernel(sch: s_tir.Schedule, block, reduce_loop, unrolled: list, lane_loop, lanes: int) -> None:
    """The innermost kernel: `unrolled` loops expanded (independent accumulators), `lane_loop` in SIMD
    lanes, the accumulators zeroed just outside `reduce_loop`, vectorized too."""
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(lane_loop)
    init = sch.decompose_reduction(block, reduce_loop)
    _vectorize(sch, sch.get_loops(init)[-1], lanes)


def _finish_epilogue(sch: s_tir.Schedule, writeback, epilogue, at_loop, lanes: int) -> None:
    """The elementwise tail folded into the accumulator's write back, which runs under `at_loop`,
    vectorized."""
    _inline_epilogue(sch, epilogue, writeback, lanes)
    sch.reverse_compute_at(writeback, at_loop, preserve_unit_loops=True)
    _vectorize(sch, sch.get_loops(writeback)[-1], lanes)


class QuantizedGEMV(_CpuRule):
    """One token times an NK64-quantized weight, the dequantize inlined into the reduction."""

    def schedule(self, sch: s_tir.Schedule) -> bool:
        blocks = _matmul_blocks(sch)
        if blocks is None or not _is_nk64_weight(sch, blocks[0]) or _static_rows(sch, blocks[1]) != 1:
            return False
        producers, main, epilogue = blocks
        lanes, config = self.config.lanes, self.config
        for info in producers:
            sch.compute_inline(info.block_rv)
        *spatial, n, k = sch.get_loops(main.block_rv)
        n_extent = int(sch.get(n).extent)
        row_vectors = next(r for r in (config.gemv_row_vectors, 2, 1) if n_extent % (r * lanes) == 0)
        n_task, n_vec, n_lane = sch.split(n, [None, row_vectors, lanes])
        k_out, k_in = sch.split(k, [None, config.k_unroll])
        sch.reorder(*spatial, n_task, k_out, k_in, n_vec, n_lane)
        sch.parallel(sch.fuse(*spatial, n_task))
        task = sch.get_loops(main.block_rv)[0]
        writeback = sch.cache_write(main.block_rv, 0, "local")
        _register_kernel(sch, main.block_rv, k_out, [k_in, n_vec], n_lane, lanes)
        _finish_epilogue(sch, writeback, epilogue, task, lanes)
        return True


class Matmul(_CpuRule):
    """Several tokens times a weight of any layout (also batched, e.g. attention scores): per thread,
    a block of output columns; that block of the weight is dequantized / repacked once into a k-major
    tile [K, columns]; then for every `gemm_rows` rows a register-blocked kernel accumulates
    rows x column-vectors over all of K. Rows and columns are padded to the kernel's multiple (a
    predicated tail would keep the accumulators in memory: 4x slower)."""

    def schedule(self, sch: s_tir.Schedule) -> bool:
        blocks = _matmul_blocks(sch)
        if blocks is None:
            return False
        producers, main, epilogue = blocks
        config, lanes = self.config, self.config.lanes
        if not isinstance(sch.get(sch.get_loops(main.block_rv)[-1]).extent, tirx.IntImm):
            return False  # K must be static
        dequantize = [i.block_rv for i in producers if sch.get(i.block_rv).name_hint.startswith(DEQUANTIZE_BLOCK)]
        for info in producers:
            if info.block_rv not in dequantize:
                sch.compute_inline(info.block_rv)
        roles = _operand_roles(sch, main.block_rv)
        if roles is None:
            return False
        columns = config.gemm_column_vectors * lanes
        last_row = max((i for i, r in enumerate(roles) if r == "row"), default=None)
        padding = [columns if r == "n" else config.gemm_rows if i == last_row else 1 for i, r in enumerate(roles)]
        before = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        sch.pad_einsum(main.block_rv, padding)
        unpad = [b for b in sch.get_consumers(main.block_rv) if sch.get(b).name_hint not in before]
        roles = _operand_roles(sch, main.block_rv)  # padding may drop unit iterators
        # the weight's tile: the dequantize, or the copy padding made of it (dequantize inlined into it)
        weight = _weight_copy(sch, main.block_rv)
        if roles is None or weight is None:
            return False
        if dequantize and sch.get(weight).name_hint != sch.get(dequantize[0]).name_hint:
            sch.compute_inline(dequantize[0])
        loops = sch.get_loops(main.block_rv)
        by_role = {role: [loop for loop, r in zip(loops, roles) if r == role] for role in ("batch", "row", "n", "k")}
        batch, rows, (n,), (k,) = by_role["batch"], by_role["row"], by_role["n"], by_role["k"]
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0] if rows else sch.add_unit_loop(main.block_rv)
        n_task, n_vec, n_lane = sch.split(n, [None, config.gemm_column_vectors, lanes])
        m_out, m_in = sch.split(row, [None, config.gemm_rows])
        sch.reorder(*batch, n_task, m_out, k, m_in, n_vec, n_lane)
        task = sch.fuse(*batch, n_task) if batch else n_task
        sch.parallel(task)
        writeback = sch.cache_write(main.block_rv, 0, "local")
        _tile_weight(sch, weight, main.block_rv, task, columns, lanes)
        _register_kernel(sch, main.block_rv, k, [m_in, n_vec], n_lane, lanes)
        _finish_epilogue(sch, writeback, [] if unpad else epilogue, m_out, lanes)
        if unpad:  # the padding is cut off by a copy that also runs the elementwise tail
            # (TVM's reverse_compute_inline of that copy drops its bound: it would write past the output)
            _inline_epilogue(sch, epilogue, unpad[0], lanes)
            _parallel_vectorized(sch, unpad[0], lanes)
        weight_name = sch.get(weight).name_hint
        for block in sch.get_producers(main.block_rv):
            if sch.get(block).name_hint.endswith("_pad") and sch.get(block).name_hint != weight_name:
                _parallel_vectorized(sch, block, lanes)
        return True


def _operand_roles(sch: s_tir.Schedule, block) -> list[str] | None:
    """Role of each iterator of C[..] += A[..] * B[..]: "k" (reduced), "n" (the last spatial one),
    "batch" (indexes B too, e.g. attention heads), "row" (indexes only A: tokens)."""
    stmt = sch.get(block)
    names = [iv.var for iv in stmt.iter_vars]
    if len(stmt.reads) < 2:
        return None
    used = [{v for r in read.region for v in undefined_vars(r.min)} for read in stmt.reads]
    n_var, k_var = names[-2], names[-1]
    with_n = [u for u in used if n_var in u and k_var in u]
    if len(with_n) != 1:
        return None
    return [
        "k" if v.same_as(k_var) else "n" if v.same_as(n_var) else "batch" if v in with_n[0] else "row" for v in names
    ]


def _weight_copy(sch: s_tir.Schedule, block):
    """A block copying the weight operand (read with the n and k iterators), to become its tile."""
    stmt = sch.get(block)
    n_var, k_var = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
    for i, read in enumerate(stmt.reads):
        idx = [r.min for r in read.region]
        if any(e.same_as(n_var) for e in idx) and any(e.same_as(k_var) for e in idx):
            producers = [b for b in sch.get_producers(block) if sch.get(b).writes[0].source.same_as(read.source)]
            return producers[0] if producers else sch.cache_read(block, i, "global")
    return None


def _tile_weight(sch: s_tir.Schedule, weight, main, task, columns: int, lanes: int) -> None:
    """The weight block writes, per task, a [K, columns] tile: k-major, so one vector load takes
    `lanes` consecutive columns; computed at the task loop, vectorized over the columns."""
    buffer = sch.get(weight).writes[0].source
    stmt = sch.get(main)
    n_var, k_var = stmt.iter_vars[-2].var, stmt.iter_vars[-1].var
    index = [r.min for r in next(r for r in stmt.reads if r.source.same_as(buffer)).region]
    n_pos = next(i for i, e in enumerate(index) if e.same_as(n_var))
    k_pos = next(i for i, e in enumerate(index) if e.same_as(k_var))
    rank = len(index)

    def layout(*dims):
        rest = [d for i, d in enumerate(dims) if i not in (n_pos, k_pos)]
        return (*rest, dims[n_pos] // columns, dims[k_pos], dims[n_pos] % columns)

    sch.transform_layout(weight, ("write", 0), tirx.IndexMap.from_func(layout, ndim=rank))
    sch.compute_at(weight, task, preserve_unit_loops=True)
    loops = sch.get_loops(weight)
    tile_n, tile_k = (loops[-2], loops[-1]) if n_pos < k_pos else (loops[-1], loops[-2])
    sch.reorder(tile_k, tile_n)
    _vectorize(sch, tile_n, lanes)


class Elementwise(_CpuRule):
    """Injective kernels: parallel over the fused outer loops, vectorized on the innermost."""

    def schedule(self, sch: s_tir.Schedule) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None or not infos or not all(info.is_injective() for info in infos):
            return False
        for info in infos[:-1]:
            sch.compute_inline(info.block_rv)
        if not sch.get_loops(infos[-1].block_rv):
            return False
        _parallel_vectorized(sch, infos[-1].block_rv, self.config.lanes)
        return True


class RowReduction(_CpuRule):
    """Norms and softmax: rows in parallel, each row's reductions and its output under that row's loop,
    the output vectorized. (dlight's `cpu.Reduction` reads the rows off the blocks' leading spatial axes;
    with one row, or a weight cast with no row axis, it parallelizes over the hidden size and redoes the
    row's reduction for every element: 1.3 ms for one 2048-wide RMSNorm.) A reduction along the row is
    factored into `lanes` partial results (`rfactor`), one SIMD vector accumulated over the row, then
    summed: as one scalar chain it waited on the add's latency per element (an RMSNorm of 2048 fp16
    values 2.2 µs per row; 0.5 ms of a 480-token prefill's 1 s per norm call, 9 µs -> 1.8 µs at 8 rows)."""

    def schedule(self, sch: s_tir.Schedule) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None or all(info.is_injective() for info in infos) or not infos[-1].is_injective():
            return False
        for info in infos[:-1]:
            if info.is_injective():
                try:
                    sch.compute_inline(info.block_rv)
                except s_tir.ScheduleError:
                    pass  # read by a reduction under another loop nest: stays a stage
        partials = [self._factor(sch, block) for block in sch.get_child_blocks(sch.get_sblock("root"))[:-1]]
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        output = blocks[-1]
        *rows, inner = sch.get_loops(output)
        if rows:
            row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            sch.parallel(row)
            for block in reversed(blocks[:-1]):
                sch.compute_at(block, row, preserve_unit_loops=True)
        for partial in partials:
            if partial is not None:
                self._vectorize_lanes(sch, partial)
        _vectorize(sch, inner, self.config.lanes)
        return True

    def _factor(self, sch: s_tir.Schedule, block):
        """The block of `lanes` partial results of `block`'s innermost reduction (rfactor), or None where
        that reduction is not along a loop that divides into vectors."""
        iters = sch.get(block).iter_vars
        if not iters or iters[-1].iter_type != tirx.IterVar.CommReduce:
            return None
        loop, lanes = sch.get_loops(block)[-1], self.config.lanes
        extent = sch.get(loop).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) % lanes or int(extent) == lanes:
            return None
        _, lane = sch.split(loop, [None, lanes])
        try:
            return sch.rfactor(lane, factor_axis=len(iters) - 1)  # partials [rows..., lanes]: a row's lanes adjacent
        except _REFUSALS:  # a reduction rfactor cannot split (several outputs): stays one chain
            return None

    def _vectorize_lanes(self, sch: s_tir.Schedule, partial) -> None:
        """The partial block's lane loop innermost and vectorized (compute_at made one loop per block
        iter; rfactor puts the lanes' iter first)."""
        lane_var = get_sblockrealize(sch, partial).iter_values[0]
        loops = [loop for loop in sch.get_loops(partial) if sch.get(loop).kind != tirx.ForKind.PARALLEL]
        lane = next((loop for loop in loops if sch.get(loop).loop_var.same_as(lane_var)), None)
        if lane is None:  # bound to an expression, not one loop: the partials stay scalar (still correct)
            return
        sch.reorder(*[loop for loop in loops if loop is not lane], lane)
        sch.vectorize(lane)


class ParallelLoops(_CpuRule):
    """Any other kernel of one loop nest over spatial iterators (the KV cache's RoPE + q/k/v split,
    whose block writes three outputs behind branches): the outer loops fused and run in parallel."""

    def schedule(self, sch: s_tir.Schedule) -> bool:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if len(blocks) != 1 or any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(blocks[0]).iter_vars):
            return False
        loops = sch.get_loops(blocks[0])
        if len(loops) < 2:
            return False
        sch.parallel(sch.fuse(*loops[:-1]))
        return True


def schedule_cpu_kernels(config: CpuKernelConfig) -> tvm.transform.Pass:
    """Every kernel: matmuls by our rules, norms and softmax by dlight's (after our inlining)."""
    return dl.ApplyDefaultSchedule(
        QuantizedGEMV(config), Matmul(config), RowReduction(config), Elementwise(config), ParallelLoops(config)
    )
