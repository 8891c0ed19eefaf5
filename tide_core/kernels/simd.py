"""16-lane vector loops for numba kernels, written as LLVM IR: the parts of the top-k selection that
LLVM does not vectorise from plain loops.

* ``row_threshold32`` adds a bias into a row in place and returns a lower bound for its 32nd largest
  entry (the minimum of 32 interleaved group maxima), or NaN if the row holds a NaN.
* ``pad_compress_ge / gt / lt / eq`` pack the entries of a buffer that compare so with a pivot, in order,
  with their int32 positions, into scratch buffers with 16 entries to spare; ``add_compress_ge`` does
  it for a row while adding the bias. On AVX-512 they compress in a register (``vcompressps``) and store
  all 16 lanes: a compressing store to memory is slow on some CPUs (AMD's Zen 4 microcodes it; on this
  Intel machine it measured about the same). Elsewhere, ``llvm.masked.compressstore``.
* ``count_gt / eq`` count the entries that compare so.

Other CPUs get LLVM's generic lowering of the same IR: slower, the same results. All compares are IEEE
ordered compares, so a NaN never passes one. Each intrinsic is inlined into the calling kernel, which
numba compiles (and caches) for the host CPU. Numba's cache keys only on the calling kernel's own file,
so ``tide_core.kernels.backend`` stamps the cache with a hash of every kernel source and wipes it when
this file changes.

The intrinsic names (``llvm.masked.*.p0``, ``llvm.vector.reduce.fmin``, opaque pointers) are those of the
LLVM that llvmlite bundles: pyproject.toml pins numba and llvmlite to the tested range.
"""

from __future__ import annotations

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic


def _targets_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512F: the host's, or the one NUMBA_CPU_NAME names (then
    only if NUMBA_CPU_FEATURES lists +avx512f)."""
    if numba.config.CPU_NAME:
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("avx512f"))


_AVX512 = _targets_avx512()
LANES = 16
GROUPS = 2 * LANES  # row_threshold32's interleaved groups: its bound holds for k <= GROUPS
_F32, _I32, _I16, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(64)
_VF, _VI, _VB = ir.VectorType(_F32, LANES), ir.VectorType(_I32, LANES), ir.VectorType(ir.IntType(1), LANES)
_LANE_IDS = ir.Constant(_VI, list(range(LANES)))
_ALIGN = ir.Constant(_I32, 4)


def _splat(builder: ir.IRBuilder, value: ir.Value, vty: ir.VectorType) -> ir.Value:
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined), ir.Constant(_VI, [0] * LANES))


def _decl(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _lanes_below(builder: ir.IRBuilder, base: ir.Value, n: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(positions base..base+15, mask of those < n)."""
    pos = builder.add(_splat(builder, base, _VI), _LANE_IDS)
    return pos, builder.icmp_signed("<", pos, _splat(builder, n, _VI))


def _masked_load(builder, ptr, mask, passthru, vty):
    name = "llvm.masked.load.v16f32.p0" if vty is _VF else "llvm.masked.load.v16i32.p0"
    return builder.call(_decl(builder, name, vty, [ptr.type, _I32, _VB, vty]), [ptr, _ALIGN, mask, passthru])


def _load(builder, ptr, live, passthru, vty):
    """16 lanes from ptr; where live is given (a tail), only those lanes (the rest: passthru)."""
    if live is None:
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)
    return _masked_load(builder, ptr, live, passthru, vty)


def _store(builder, v, ptr, live):
    """16 lanes to ptr; where live is given (a tail), only those lanes."""
    if live is None:
        builder.store(v, builder.bitcast(ptr, v.type.as_pointer()), align=4)
    else:
        store = _decl(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [_VF, ptr.type, _I32, _VB])
        builder.call(store, [v, ptr, _ALIGN, live])


def _pack_store(builder, v, base_ptr, at, keep):
    """The lanes of v where keep, packed in order to base_ptr[at:], which has 16 entries to spare: on
    AVX-512 compressed in a register and stored whole."""
    vty = v.type
    suffix = "v16f32" if vty is _VF else "v16i32"
    ptr = builder.gep(base_ptr, [at])
    if _AVX512:
        pack = _decl(builder, f"llvm.x86.avx512.mask.compress.{suffix}", vty, [vty, vty, _VB])
        builder.store(builder.call(pack, [v, ir.Constant(vty, None), keep]), builder.bitcast(ptr, vty.as_pointer()),
                      align=4)
    else:
        store = _decl(builder, f"llvm.masked.compressstore.{suffix}", ir.VoidType(), [vty, ptr.type, _VB])
        builder.call(store, [v, ptr, keep])


def _for_blocks(builder: ir.IRBuilder, n: ir.Value, width: int, body) -> None:
    """body(base, tail) for each block of ``width`` entries of [0, n): whole blocks with tail=False (plain
    loads, no masks), then a last partial block, if any, with tail=True."""
    whole = builder.udiv(n, ir.Constant(_I32, width))
    with cgutils.for_range(builder, whole) as loop:
        body(builder.mul(builder.trunc(loop.index, _I32), ir.Constant(_I32, width)), False)
    start = builder.mul(whole, ir.Constant(_I32, width))
    with builder.if_then(builder.icmp_signed("<", start, n), likely=False):
        body(start, True)


def _make_compress(op: str, doc: str):
    @intrinsic
    def compress(typingctx, val, idx, m, pivot, out_val, out_idx):
        sig = types.intp(val, idx, m, pivot, out_val, out_idx)
        return sig, lambda context, builder, signature, args: _compress_loop(op, context, builder, signature,
                                                                               args)

    compress.__doc__ = (f"pad_compress_{doc}(val f32[:], idx i32[:] or None, m, pivot f32, out_val f32[:] or "
                        f"None, out_idx i32[:] or None) -> c: packs val[i] {op} pivot (i < m) into out_val[:c] in "
                        "order, their idx (None: the positions i) into out_idx[:c] (None: not kept). The outputs "
                        "need 16 entries to spare past c and must not overlap the inputs.")
    return compress


def _make_count(op: str, doc: str):
    @intrinsic
    def count(typingctx, val, m, pivot):
        sig = types.intp(val, m, pivot)
        return sig, lambda context, builder, signature, args: _compress_loop(
            op, context, builder, types.intp(signature.args[0], types.none, *signature.args[1:], types.none,
                                              types.none), [args[0], None, *args[1:], None, None])

    count.__doc__ = f"count_{doc}(val f32[:], m, pivot f32) -> how many of val[:m] are {op} pivot."
    return count


def _compress_loop(op, context, builder, signature, args):
    """The loop behind compress_* and count_*: 16 entries per step."""
    src, src_idx, dst, dst_idx = (
        None if isinstance(signature.args[i], types.NoneType)
        else context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1, 4, 5))
    m_ = builder.trunc(args[2], _I32)
    piv = _splat(builder, args[3], _VF)
    popcount = _decl(builder, "llvm.ctpop.i16", _I16, [_I16])
    count = cgutils.alloca_once_value(builder, ir.Constant(_I32, 0))

    def body(base, tail):
        pos, live = _lanes_below(builder, base, m_)
        live = live if tail else None
        v = _load(builder, builder.gep(src.data, [base]), live, ir.Constant(_VF, None), _VF)
        keep = builder.fcmp_ordered(op, v, piv)
        keep = builder.and_(keep, live) if tail else keep
        c = builder.load(count)
        if dst is not None:
            _pack_store(builder, v, dst.data, c, keep)
        if dst_idx is not None:
            ids = (_load(builder, builder.gep(src_idx.data, [base]), live, ir.Constant(_VI, None), _VI)
                   if src_idx is not None else pos)
            _pack_store(builder, ids, dst_idx.data, c, keep)
        kept = builder.zext(builder.call(popcount, [builder.bitcast(keep, _I16)]), _I32)
        builder.store(builder.add(c, kept), count)

    _for_blocks(builder, m_, LANES, body)
    return builder.sext(builder.load(count), _I64)


pad_compress_ge = _make_compress(">=", "ge")
pad_compress_gt = _make_compress(">", "gt")
pad_compress_lt = _make_compress("<", "lt")
pad_compress_eq = _make_compress("==", "eq")
count_gt = _make_count(">", "gt")
count_eq = _make_count("==", "eq")


@intrinsic
def add_compress_ge(typingctx, row, bias, pivot, out_val, out_idx):
    """add_compress_ge(row f32[:], bias f32[:] or None, pivot f32, out_val f32[:], out_idx i32[:]) -> c:
    adds bias into row in place (as row_threshold32 does) and, in the same sweep, packs the entries >=
    pivot and their positions into out_val[:c] / out_idx[:c], which need 16 entries to spare (as
    pad_compress_ge). -1 if the row holds a NaN."""
    with_bias = not isinstance(bias, types.NoneType)
    sig = types.intp(row, bias, pivot, out_val, out_idx)

    def codegen(context, builder, signature, args):
        r, b, _, dst, dst_idx = (None if isinstance(t, types.NoneType) or not isinstance(t, types.Array)
                                 else context.make_array(t)(context, builder, a)
                                 for t, a in zip(signature.args, args, strict=True))
        n = builder.trunc(r.nitems, _I32)
        piv = _splat(builder, args[2], _VF)
        popcount = _decl(builder, "llvm.ctpop.i16", _I16, [_I16])
        count = cgutils.alloca_once_value(builder, ir.Constant(_I32, 0))
        nan = cgutils.alloca_once_value(builder, ir.Constant(_VB, [0] * LANES))

        def body(base, tail):
            pos, live = _lanes_below(builder, base, n)
            live = live if tail else None
            ptr = builder.gep(r.data, [base])
            v = _load(builder, ptr, live, ir.Constant(_VF, None), _VF)
            if with_bias:
                v = builder.fadd(v, _load(builder, builder.gep(b.data, [base]), live, ir.Constant(_VF, None), _VF))
                _store(builder, v, ptr, live)
            keep = builder.fcmp_ordered(">=", v, piv)
            bad = builder.fcmp_unordered("uno", v, v)
            if tail:
                keep, bad = builder.and_(keep, live), builder.and_(bad, live)
            builder.store(builder.or_(builder.load(nan), bad), nan)
            c = builder.load(count)
            _pack_store(builder, v, dst.data, c, keep)
            _pack_store(builder, pos, dst_idx.data, c, keep)
            kept = builder.zext(builder.call(popcount, [builder.bitcast(keep, _I16)]), _I32)
            builder.store(builder.add(c, kept), count)

        _for_blocks(builder, n, LANES, body)
        any_nan = builder.icmp_unsigned("!=", builder.bitcast(builder.load(nan), _I16), ir.Constant(_I16, 0))
        return builder.select(any_nan, ir.Constant(_I64, -1), builder.sext(builder.load(count), _I64))

    return sig, codegen


@intrinsic
def row_threshold32(typingctx, row, bias):
    """row_threshold32(row f32[:], bias f32[:] or None) -> f32: adds bias into row in place (the same
    IEEE add as numpy's or torch's), then returns the minimum over GROUPS interleaved groups (group g holds
    entries g, g + 32, ...) of each group's maximum: each group holds an entry >= it, so it bounds the k-th
    largest entry from below for every k <= 32 (-inf for a row shorter than 32). NaN if the row holds a
    NaN."""
    with_bias = not isinstance(bias, types.NoneType)
    sig = types.float32(row, bias)

    def codegen(context, builder, signature, args):
        r = context.make_array(signature.args[0])(context, builder, args[0])
        b = context.make_array(signature.args[1])(context, builder, args[1]) if with_bias else None
        n = builder.trunc(r.nitems, _I32)
        neg_inf = ir.Constant(_VF, [float("-inf")] * LANES)
        acc = [cgutils.alloca_once_value(builder, neg_inf) for _ in range(GROUPS // LANES)]
        nan = cgutils.alloca_once_value(builder, ir.Constant(_VB, [0] * LANES))

        def body(start, tail):
            for part, a in enumerate(acc):
                base = builder.add(start, ir.Constant(_I32, part * LANES))
                live = _lanes_below(builder, base, n)[1] if tail else None
                ptr = builder.gep(r.data, [base])
                v = _load(builder, ptr, live, neg_inf, _VF)  # lanes past the end: -inf
                if with_bias:
                    v = builder.fadd(v, _load(builder, builder.gep(b.data, [base]), live, ir.Constant(_VF, None),
                                              _VF))
                    _store(builder, v, ptr, live)
                best = builder.load(a)
                builder.store(builder.select(builder.fcmp_ordered(">", v, best), v, best), a)
                builder.store(builder.or_(builder.load(nan), builder.fcmp_unordered("uno", v, v)), nan)

        _for_blocks(builder, n, GROUPS, body)
        low = builder.load(acc[0])
        for a in acc[1:]:
            other = builder.load(a)
            low = builder.select(builder.fcmp_ordered("<", low, other), low, other)
        low = builder.call(_decl(builder, "llvm.vector.reduce.fmin.v16f32", _F32, [_VF]), [low])
        any_nan = builder.icmp_unsigned("!=", builder.bitcast(builder.load(nan), _I16), ir.Constant(_I16, 0))
        return builder.select(any_nan, ir.Constant(_F32, float("nan")), low)

    return sig, codegen
