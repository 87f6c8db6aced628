//! Ctrl-C, SIGTERM and SIGHUP while a run holds sandboxes: the first signal asks the run to
//! stop — running commands are killed, episodes end `interrupted`, work trees are removed and
//! what finished is written — and a second one exits at once (the next run removes what was
//! left). Outside a [`watch`] the signals keep their default action.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Nesting depth of watches and the actions to restore when the outermost ends.
static WATCH: Mutex<(usize, Vec<libc::sigaction>)> = Mutex::new((0, vec![]));

/// Whether a stop was asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The signal that asked, for the exit status (128 + signal).
pub fn signal() -> Option<i32> {
    Some(SIGNAL.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// The error a run returns when it stopped on a signal (after writing what it could).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by signal {0}: finished results were written, unfinished work was discarded")]
pub struct Interrupted(pub i32);

/// `Err(Interrupted)` when a stop was asked for.
pub fn check() -> anyhow::Result<()> {
    match signal() {
        Some(s) if requested() => Err(Interrupted(s).into()),
        _ if requested() => Err(Interrupted(0).into()),
        _ => Ok(()),
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) }
    }
    SIGNAL.store(sig, Ordering::SeqCst);
    let msg = b"\nprotege: stopping (finished results are kept; a second signal exits at once)\n";
    // SAFETY: write(2) is async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Handles the signals until the returned guard (the outermost, when nested) is dropped.
pub fn watch() -> Guard {
    let mut w = WATCH.lock().unwrap_or_else(|e| e.into_inner());
    if w.0 == 0 {
        w.1.clear();
        for sig in SIGNALS {
            // SAFETY: installing a handler that only touches atomics and calls write/_exit.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(sig, &new, &mut old);
                w.1.push(old);
            }
        }
    }
    w.0 += 1;
    Guard(())
}

pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        let mut w = WATCH.lock().unwrap_or_else(|e| e.into_inner());
        w.0 -= 1;
        if w.0 == 0 {
            for (sig, old) in SIGNALS.iter().zip(w.1.iter()) {
                // SAFETY: restoring the action saved by `watch`.
                unsafe {
                    libc::sigaction(*sig, old, std::ptr::null_mut());
                }
            }
        }
    }
}
