//! Printing an error with its causes, the one way every layer and the
//! binary do it.

use std::error::Error;
use std::fmt::Write as _;

/// `err` followed by each of its sources, `: `-separated. Errors in filevol
/// do not repeat their source in their own message, so nothing is said
/// twice.
pub fn message_chain(err: &dyn Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let _ = write!(msg, ": {cause}");
        source = cause.source();
    }
    msg
}
