//! SIGTERM/SIGINT handling. A signal-hook thread only *notifies*: the first
//! signal starts a graceful drain in the main thread; a second one means the
//! operator wants out now, and the process exits at once.

use std::io;

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Starts watching for SIGTERM and SIGINT. The receiver yields the first
/// signal's number.
pub fn watch() -> io::Result<Receiver<i32>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("filevol-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    let _ = tx.send(sig);
                } else {
                    log::warn!("second {} received: exiting without draining", name(sig));
                    // The one exit outside `main`: a second signal is the
                    // operator saying the drain takes too long, and `main`
                    // is blocked in that drain.
                    #[allow(clippy::exit)]
                    std::process::exit(128 + sig);
                }
            }
        })?;
    Ok(rx)
}

/// The signal's name for log lines.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "signal",
    }
}
