//! The `protege` binary: everything, from parsing the command line on, is [`protege::cli`].

fn main() -> std::process::ExitCode {
    protege::cli::main()
}
