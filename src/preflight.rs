//! Checks that the kernel lets this process run the io_uring data plane, so a refusal
//! becomes one clear message instead of a panic deep inside the executor.

/// glommio refuses to start below this locked-memory limit.
const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

pub fn check() -> Result<(), String> {
    check_io_uring_sysctl()?;
    check_memlock()?;
    check_io_uring_setup()
}

fn check_io_uring_sysctl() -> Result<(), String> {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) if v.trim() == "2" => Err(
            "io_uring is disabled on this kernel (kernel.io_uring_disabled = 2); \
             set it to 0 with `sysctl -w kernel.io_uring_disabled=0`"
                .into(),
        ),
        _ => Ok(()),
    }
}

fn check_memlock() -> Result<(), String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Ok(());
    }
    if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur < MIN_MEMLOCK_BYTES {
        return Err(format!(
            "the locked-memory limit is {} KiB; io_uring needs at least {} KiB. \
             Raise it with `ulimit -l {}` (or LimitMEMLOCK= in the systemd unit, \
             memlock in /etc/security/limits.conf)",
            limit.rlim_cur / 1024,
            MIN_MEMLOCK_BYTES / 1024,
            MIN_MEMLOCK_BYTES / 1024
        ));
    }
    Ok(())
}

/// Creates and closes a tiny ring: the real test of whether io_uring is allowed
/// (seccomp profiles and containers often forbid it).
fn check_io_uring_setup() -> Result<(), String> {
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup takes an entry count and a pointer to a 120-byte
    // io_uring_params struct, zeroed here; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!(
            "io_uring is not available ({err}); HeliosProxy needs Linux 5.8 or newer with \
             io_uring allowed (check seccomp/container settings and kernel.io_uring_disabled)"
        ));
    }
    // SAFETY: fd is the ring descriptor we just created.
    unsafe { libc::close(fd as i32) };
    Ok(())
}
