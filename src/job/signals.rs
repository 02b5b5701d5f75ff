//! SIGINT/SIGTERM: the first stops the run after the current step (finished
//! rows flushed, the manifest marked interrupted); a second exits at once
//! (parts and manifest are consistent on disk at every instant).

use crate::{Error, Result};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Exit code of a run stopped by a signal.
pub const INTERRUPTED_EXIT: i32 = 130;

/// A flag that the first SIGINT or SIGTERM sets.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let fail =
            |e: std::io::Error| Error::Engine(format!("cannot install a signal handler: {e}"));
        signal_hook::flag::register_conditional_shutdown(sig, INTERRUPTED_EXIT, Arc::clone(&stop))
            .map_err(fail)?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(fail)?;
    }
    Ok(stop)
}
