use std::process::ExitCode;

fn main() -> ExitCode {
    mayfly::cli::main()
}
