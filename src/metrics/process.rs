//! Figures of this process, read from /proc at each scrape.

pub(super) struct ProcessFigures {
    pub resident_bytes: i64,
    pub cpu_seconds: f64,
    pub open_fds: i64,
}

/// From /proc (Linux); zeros elsewhere.
pub(super) fn process_figures() -> ProcessFigures {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let resident_kib: i64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    ProcessFigures {
        resident_bytes: resident_kib * 1024,
        cpu_seconds: (ticks(11) + ticks(12)) / hz,
        open_fds,
    }
}
