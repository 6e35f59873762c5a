//! The `chekt-agent` binary: everything lives in the library; see `cli`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    chekt_agent::cli::main()
}
