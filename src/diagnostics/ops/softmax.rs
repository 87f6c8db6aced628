//! Softmax and log-softmax over rows of logits (kernels/softmax.cu).

use super::{Ctx, OpFamily, TOL_NORM};
use crate::backend::Backend;

/// The row's maximum and sum are f32 reductions of bf16 logits; each output is then one
/// rounding of an exponential (softmax) or of a difference that cancels near the maximum
/// (log-softmax), amplified by the normalisation: [`TOL_NORM`].
pub const TOL: f64 = TOL_NORM;

pub struct Softmax;

impl OpFamily for Softmax {
    const NAME: &'static str = "softmax";
    const SEED: u64 = 57;
    const TRAIN_SEED: u64 = 59;
    /// (rows, cols, log): a small vocabulary and the real one, each as softmax and log-softmax.
    type Case = (usize, usize, bool);
    type TrainCase = ();

    fn cases(&self) -> Vec<Self::Case> {
        [(9, 455), (3, 151_936)].into_iter().flat_map(|(r, c)| [(r, c, false), (r, c, true)]).collect()
    }

    fn check<B: Backend>(&self, t: &mut Ctx<'_, B>, &(rows, cols, log): &Self::Case) {
        let (dev, cpu) = (t.dev, t.cpu);
        let logits = t.random(rows * cols, 8.0);
        let (mut dl, mut cl) = t.both(&logits);
        if log {
            dev.log_softmax(&mut dl, rows, cols);
            cpu.log_softmax(&mut cl, rows, cols);
        } else {
            dev.softmax(&mut dl, rows, cols);
            cpu.softmax(&mut cl, rows, cols);
        }
        t.add(
            "softmax",
            format!("{} rows={rows} cols={cols}", if log { "log_softmax" } else { "softmax" }),
            t.err(&dl, &cl, rows * cols),
            TOL,
        );
    }
}
