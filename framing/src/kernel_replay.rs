//! Unacknowledged bytes kept in the local socket's own receive queue.
//!
//! A resumable session must keep every byte it read from its local socket
//! until the peer acknowledges it. Kept in the process's memory, each byte
//! is copied into memory last touched a window ago and long out of the
//! cache: with eight bulk streams that copy made the sending proxy cost
//! 10 % more CPU per byte than resume off (BENCHMARKS.md, 2026-12-05).
//!
//! The receive queue holds those bytes already. Linux (6.9 and later) lets
//! a TCP socket *peek* at an offset that advances with each peek
//! (`SO_PEEK_OFF`): the session reads new bytes with `MSG_PEEK` into a
//! buffer it used a moment ago, as resume off does, and leaves them queued.
//! Acknowledged bytes are dropped from the head without a copy
//! (`MSG_TRUNC`); bytes that must be sent again, or that the queue cannot
//! hold, are read from the head into memory, and the offset follows.
//!
//! The queue holds what the socket's receive buffer allows, and Linux sizes
//! that buffer for TCP's needs, not for ours: it is set here, which
//! `net.core.rmem_max` caps (208 KiB on a stock kernel). Below a useful size
//! the session keeps its bytes in memory as before.
//!
//! The one `unsafe` block sets `SO_PEEK_OFF`, which neither `rustix` nor
//! `socket2` wraps: a `setsockopt` of one `c_int` on a descriptor we hold.

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;

/// Where the kernel's cap on receive buffers is read.
const RMEM_MAX: &str = "/proc/sys/net/core/rmem_max";

/// Turns peeking on for `tcp` and sizes its receive buffer for `wanted`
/// bytes; returns how many bytes the queue may be asked to hold, or `None`
/// (nothing changed) when that would be less than `least` or the kernel
/// cannot peek at an offset on TCP.
pub fn enable(tcp: &TcpStream, wanted: usize, least: usize) -> Option<usize> {
    let cap = std::fs::read_to_string(RMEM_MAX)
        .ok()?
        .trim()
        .parse::<usize>()
        .ok()?;
    if cap.min(wanted) < least {
        return None;
    }
    set_peek_offset(tcp, 0).ok()?;
    let socket = socket2::SockRef::from(tcp);
    if socket.set_recv_buffer_size(wanted).is_err() {
        let _ = set_peek_offset(tcp, -1);
        return None;
    }
    // Linux reports twice what it was asked, room for its bookkeeping; how
    // much of it holds data depends on the segments' sizes. The limit is
    // what the window may ask of the queue: a queue that holds less makes
    // the local application wait, as TCP would, until acks free its head.
    let granted = socket.recv_buffer_size().ok()?;
    (granted / 2 >= least).then_some(granted.min(wanted))
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_peek_offset(tcp: &TcpStream, offset: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp` owns an open socket descriptor for this call, and the
    // option's value is a `c_int` passed with its own size.
    let result = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            std::ptr::from_ref(&offset).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_peek_offset(_tcp: &TcpStream, _offset: i32) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Copies up to `room` bytes past the peek offset into a new buffer,
/// advancing the offset; the bytes stay queued. An empty buffer is the end
/// of input.
pub fn peek(tcp: &TcpStream, room: usize) -> io::Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(room.max(1));
    rustix::net::recv(
        tcp,
        rustix::buffer::spare_capacity(&mut buffer),
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    )?;
    Ok(buffer)
}

/// Takes exactly `count` bytes from the head of the queue, which holds them
/// (they were peeked).
pub fn take(tcp: &TcpStream, count: usize) -> io::Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(count);
    while buffer.len() < count {
        let before = buffer.len();
        let mut rest = Vec::with_capacity(count - before);
        let (got, _) = rustix::net::recv(
            tcp,
            rustix::buffer::spare_capacity(&mut rest),
            rustix::net::RecvFlags::DONTWAIT,
        )?;
        if got == 0 {
            return Err(short_queue(count - before));
        }
        if before == 0 {
            buffer = rest;
        } else {
            buffer.extend_from_slice(&rest);
        }
    }
    Ok(buffer)
}

thread_local! {
    /// Lends the calls that drop queued bytes a length; the kernel writes
    /// nothing there, so its pages are never touched. One per thread, not
    /// per session: ten thousand sessions need not reserve ten thousand.
    static DISCARD_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Most bytes dropped by one call.
const DISCARD_STEP: usize = 1024 * 1024;

/// Drops `count` bytes from the head of the queue without copying them.
pub fn discard(tcp: &TcpStream, count: u64) -> io::Result<()> {
    DISCARD_SCRATCH.with_borrow_mut(|scratch| {
        if scratch.capacity() < DISCARD_STEP {
            *scratch = Vec::with_capacity(DISCARD_STEP);
        }
        let mut left = count;
        while left > 0 {
            let step = usize::try_from(left).map_or(DISCARD_STEP, |left| left.min(DISCARD_STEP));
            let flags = rustix::net::RecvFlags::TRUNC | rustix::net::RecvFlags::DONTWAIT;
            let spare = &mut scratch.spare_capacity_mut()[..step];
            let (_, dropped) = rustix::net::recv(tcp, spare, flags)?;
            if dropped == 0 {
                return Err(short_queue(left));
            }
            left = left.saturating_sub(dropped as u64);
        }
        Ok(())
    })
}

fn short_queue(missing: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!(
        "the local socket's receive queue no longer holds {missing} bytes kept for the session"
    ))
}
