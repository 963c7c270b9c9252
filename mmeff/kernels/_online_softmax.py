"""The online-softmax steps shared by the block-sparse and the chunk-routed (query- and key-major) kernels
(Triton, inlined).

Scores are kept in log2 units (``qk_scale`` already holds ``scale * log2(e)``), the running max and sum
in float32; ``finish_rows`` turns the state into the normalised output and the natural-log LSE
(``-inf`` and a zero row for a row that saw no key).
"""
from __future__ import annotations

from ._common import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def attend_key_tile(q, k, v, valid, m_i, l_i, acc, qk_scale,
                        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """Fold one key tile (``k`` [D, BN], ``v`` [BN, D], ``valid`` [BM, BN]) into ``(m_i, l_i, acc)``."""
        if DOT_IN_FP32:  # Triton's CPU interpreter multiplies 16-bit tiles wrongly, so widen them there
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision=DOT_PRECISION) * qk_scale
        else:
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 instead to avoid nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        p_lo = p.to(v.dtype)  # round p like the GPU path does before the PV product
        if DOT_IN_FP32:
            pv = tl.dot(p_lo.to(tl.float32), v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            pv = tl.dot(p_lo, v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def finish_rows(m_i, l_i, acc):
        """``(out, lse)`` from the online-softmax state: ``out = acc / l``, ``lse = ln2 * (m + log2 l)``."""
        has_key = l_i > 0.0
        l_safe = tl.where(has_key, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        return out, lse
