//! Element-wise and reduction kernels, written to auto-vectorise and compiled for AVX2+FMA
//! behind a run-time check (the default x86-64 target has only SSE2).

/// Runs `body` compiled with AVX2+FMA when the CPU has them.
macro_rules! with_avx2 {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected at run time.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler use full SIMD registers.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}
with_avx2!(dot, dot_body, (a: &[f32], b: &[f32]) -> f32);

/// `e^x` in f32 to about 1 ulp (the Cephes polynomial), branch-free so that loops over it
/// vectorise; libm's `expf` is a scalar call and dominated SwiGLU.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1_f64 as f32;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-g))
}

#[inline(always)]
fn swiglu_body(o: &mut [f32], g: &[f32], u: &[f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + exp_f32(-g)) * u;
    }
}
with_avx2!(swiglu, swiglu_body, (o: &mut [f32], g: &[f32], u: &[f32]) -> ());

/// Gradients of `silu(g) * u`: `dg = do * u * s * (1 + g * (1 - s))`, `du = do * silu(g)`.
#[inline(always)]
fn swiglu_bwd_body(dout: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..dout.len().min(g.len()).min(u.len()).min(dg.len()).min(du.len()) {
        let s = sigmoid(g[i]);
        dg[i] = dout[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        du[i] = dout[i] * g[i] * s;
    }
}
with_avx2!(swiglu_bwd, swiglu_bwd_body, (dout: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) -> ());

/// Softmax of one row in place; returns the row's log-sum-exp.
pub fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in -1990..=2000 {
            let x = i as f32 * 0.0437;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp_f32(-1000.0), exp_f32(-87.336_55));
        assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(1000.0).is_finite());
    }

    #[test]
    fn dot_handles_remainders() {
        for n in [0, 1, 7, 8, 9, 31] {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(dot(&a, &a), (0..n).map(|i| (i * i) as f32).sum::<f32>());
        }
    }
}
