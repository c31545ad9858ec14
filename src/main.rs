use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: the issuance path makes many small, short-lived
/// allocations across threads, where glibc's arenas spent ~10 % of the daemon's CPU
/// (`bench/cost-centres`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    mayfly::cli::main()
}
