//! Matrix products on the CPU.
//!
//! Large products go through the `gemm` crate (runtime-dispatched AVX2/AVX-512 micro-kernels,
//! what candle uses), split by us into independent blocks, one single-threaded `gemm` each:
//! on two cores `gemm`'s own threading reached ~116 GFLOP/s at the Qwen2.5-0.5B MLP shape,
//! blocks of at most 512 output columns ~155 (PyTorch/MKL: ~140-175). Products with only a few
//! rows — the decode step — are memory-bound and get a kernel that streams each weight row once.

use gemm::Parallelism;
use rayon::prelude::*;

use super::vector::dot;

/// A raw pointer that rayon tasks may share because each writes a disjoint region.
#[derive(Clone, Copy)]
pub(super) struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    pub fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// A row-major matrix used as is, or transposed (`t`).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub t: bool,
}

/// `m` as is.
pub fn as_is(data: &[f32]) -> Mat<'_> {
    Mat { data, t: false }
}

/// `m` transposed.
pub fn transposed(data: &[f32]) -> Mat<'_> {
    Mat { data, t: true }
}

/// `dst[m, n] = (accumulate ? dst : 0) + alpha * op(a)[m, k] @ op(b)[k, n]`, row-major `dst`.
/// `op(a)` is `a: [m, k]`, or `a: [k, m]` transposed; `op(b)` is `b: [k, n]`, or `b: [n, k]`
/// transposed. With `par` the product is split over the rayon pool.
pub fn mm(dst: &mut [f32], a: Mat, b: Mat, m: usize, n: usize, k: usize, accumulate: bool, alpha: f32, par: bool) {
    assert!(dst.len() >= m * n && a.data.len() >= m * k && b.data.len() >= k * n, "mm: operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // Element strides: (row, column) of op(a) and op(b).
    let (a_rs, a_cs) = if a.t { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if b.t { (1, k) } else { (n, 1) };
    let (d, ap, bp) = (SharedMut(dst.as_mut_ptr()), a.data.as_ptr() as usize, b.data.as_ptr() as usize);
    // One block: rows [r0, r1) by columns [c0, c1) of dst.
    let block = move |r0: usize, r1: usize, c0: usize, c1: usize| {
        // SAFETY: blocks are disjoint and the strides above keep every access inside the
        // operands, whose sizes were checked.
        unsafe {
            gemm::gemm(
                r1 - r0,
                c1 - c0,
                k,
                d.ptr().add(r0 * n + c0),
                1,
                n as isize,
                accumulate,
                (ap as *const f32).add(r0 * a_rs),
                a_cs as isize,
                a_rs as isize,
                (bp as *const f32).add(c0 * b_cs),
                b_cs as isize,
                b_rs as isize,
                1.0,
                alpha,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    let threads = if par { rayon::current_num_threads() } else { 1 };
    if threads > 1 && n >= 64 * threads {
        let cols = n.div_ceil(threads).next_multiple_of(16).min(512);
        (0..n.div_ceil(cols)).into_par_iter().for_each(|i| block(0, m, i * cols, ((i + 1) * cols).min(n)));
    } else if threads > 1 && m >= 16 * threads {
        let rows = m.div_ceil(threads);
        (0..m.div_ceil(rows)).into_par_iter().for_each(|i| block(i * rows, ((i + 1) * rows).min(m), 0, n));
    } else {
        block(0, m, 0, n);
    }
}

/// `out[m, n] = x[m, k] @ w[n, k]^T` for a handful of rows: each weight row is read once.
pub fn matvec_rows(out: &mut [f32], x: &[f32], w: &[f32], m: usize, k: usize, n: usize) {
    const COLS_PER_TASK: usize = 64;
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|task| {
        let (lo, hi) = (task * COLS_PER_TASK, ((task + 1) * COLS_PER_TASK).min(n));
        for j in lo..hi {
            let wrow = &w[j * k..(j + 1) * k];
            for r in 0..m {
                let v = dot(&x[r * k..(r + 1) * k], wrow);
                // SAFETY: column j of every row belongs to this task alone.
                unsafe { *out_ptr.ptr().add(r * n + j) = v };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transpose_combination_matches_a_naive_product() {
        let (m, n_, k) = (37, 70, 19);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
        let b: Vec<f32> = (0..k * n_).map(|i| ((i * 5 % 11) as f32 - 5.0) / 5.0).collect();
        let at = |i: usize, p: usize, tr: bool| if tr { a[p * m + i] } else { a[i * k + p] };
        let bt = |p: usize, j: usize, tr: bool| if tr { b[j * k + p] } else { b[p * n_ + j] };
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for par in [false, true] {
                let mut dst = vec![1.0f32; m * n_];
                let (ma, mb) = (Mat { data: &a, t: ta }, Mat { data: &b, t: tb });
                mm(&mut dst, ma, mb, m, n_, k, true, 0.5, par);
                for i in 0..m {
                    for j in 0..n_ {
                        let want = 1.0 + 0.5 * (0..k).map(|p| at(i, p, ta) * bt(p, j, tb)).sum::<f32>();
                        assert!((dst[i * n_ + j] - want).abs() < 1e-4, "ta {ta} tb {tb} par {par} ({i},{j})");
                    }
                }
            }
        }
    }
}
