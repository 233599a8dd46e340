//! What the process asks of the operating system: memory figures from
//! `/proc`, and handing freed heap back.

/// A `Key: N kB` line of a Linux `/proc` file (`/proc/meminfo`,
/// `/proc/PID/status`), in bytes.
pub fn proc_bytes(path: &str, key: &str) -> Option<usize> {
    let text = std::fs::read_to_string(path).ok()?;
    let kib: usize = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The machine's physical memory, if known.
pub fn physical_memory() -> Option<usize> {
    proc_bytes("/proc/meminfo", "MemTotal")
}

/// Resident memory of this process, if known.
pub fn resident_memory() -> Option<usize> {
    proc_bytes("/proc/self/status", "VmRSS")
}

/// Hands heap memory that is free back to the operating system. glibc keeps
/// freed chunks for reuse, so without this the KV of a long request that
/// has ended would stay resident; other allocators return memory themselves.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory that no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}
