//! Logging set-up. The policy (what each level is for, and that secrets never
//! appear at any level) is written down in docs/src/operating.md.

/// Sends `log` records (ours and gRPC core's) to stderr at `level`.
///
/// gRPC core is chatty at info and debug (experiment tables, poller
/// choices), so it only reports errors (a failed bind, say) unless the level
/// is `trace`.
pub fn init(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp_millis()
        .target(env_logger::Target::Stderr)
        .init();
    // redirect_log() takes gRPC core's verbosity from log::max_level().
    if level < log::LevelFilter::Trace {
        log::set_max_level(level.min(log::LevelFilter::Warn));
    }
    grpcio::redirect_log();
    log::set_max_level(level);
}
