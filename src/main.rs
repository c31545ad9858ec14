use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the issuance path makes many small, short-lived
/// allocations across threads, where glibc's arenas spent ~10 % of the daemon's CPU
/// (`bench/cost-centres`). Built without transparent huge pages (`no_thp`): with them each
/// thread's first arena faulted in 2 MiB, and the idle daemon's RSS went from 32 to 51 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    mayfly::cli::main()
}
