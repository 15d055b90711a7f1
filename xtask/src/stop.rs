//! Stop requests. SIGINT, SIGTERM and SIGHUP set a flag instead of ending xtask on the spot,
//! so whatever is waiting (a cargo step, the demo, a benchmark run) kills its children and
//! returns: a signal never leaves a child running. Every wait is bounded, so this is prompt.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// The number of the last stop signal received, 0 while none.
static RECEIVED: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

/// Catches the stop signals from now on. Called once, first thing in `main`.
pub fn install() -> Result<()> {
    let received = RECEIVED.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        let value = usize::try_from(signal).context("signal numbers are positive")?;
        signal_hook::flag::register_usize(signal, Arc::clone(received), value)
            .with_context(|| format!("catching signal {signal}"))?;
    }
    Ok(())
}

/// The name of the stop signal received, if any.
pub fn requested() -> Option<&'static str> {
    let received = RECEIVED.get()?.load(Ordering::SeqCst);
    let name = match i32::try_from(received).ok()? {
        0 => return None,
        SIGINT => "Ctrl-C (SIGINT)",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    };
    Some(name)
}

/// An error once a stop signal has been received, for checks between steps.
pub fn check() -> Result<()> {
    if let Some(name) = requested() {
        bail!("interrupted by {name}");
    }
    Ok(())
}

/// Resolves once a stop signal has been received, naming it.
pub async fn requested_async() -> &'static str {
    loop {
        if let Some(name) = requested() {
            return name;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
