//! The open-file limit, and how many idle streams it allows.
//!
//! Every process on a stream's path holds two sockets per stream: the bench
//! the client and the target ends, the relay both WebSockets, each proxy one
//! TCP connection and one WebSocket (the peers alike). Children inherit the
//! limit, so it is raised once here, before anything is spawned. Raising the
//! hard limit needs CAP_SYS_RESOURCE; without it (a container's root often
//! lacks it) the soft limit goes up to the hard one, and the idle-stream
//! count is capped to what fits, with the reason in the report.

/// Open files the bench asks for (itself and its children).
pub const WANTED_OPEN_FILES: u64 = 65_536;

/// Descriptors a process needs besides its streams' sockets (listeners,
/// epoll, the control channel, the registry, logs), counted generously: the
/// busiest process seen holds 27 at rest.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft and, when allowed, the hard limit on open files towards
/// `wanted`. Returns the soft limit now in force.
pub fn raise_open_file_limit(wanted: u64) -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass, which lives here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max.max(wanted),
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(wanted);
    }
    // No CAP_SYS_RESOURCE: go as high as the hard limit allows.
    let within_hard_limit = libc::rlimit {
        rlim_cur: limit.rlim_max.min(wanted),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &within_hard_limit) } == 0 {
        return Ok(within_hard_limit.rlim_cur);
    }
    Ok(limit.rlim_cur)
}

/// Idle streams every process can hold under `limit` open files, while
/// `concurrency` more are being set up (each set-up briefly holds an extra
/// connection or two).
pub fn idle_streams_allowed(limit: u64, concurrency: usize) -> usize {
    let spare = limit.saturating_sub(RESERVED_DESCRIPTORS + 2 * concurrency as u64);
    (spare / 2) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_thousand_descriptors_hold_just_under_ten_thousand_streams() {
        assert_eq!(idle_streams_allowed(20_000, 64), 9_904);
        assert!(idle_streams_allowed(65_536, 64) > 10_000);
        assert_eq!(idle_streams_allowed(100, 64), 0);
    }
}
