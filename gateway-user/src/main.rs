//! The `turnstile` binary: all wiring lives in [`gateway_user::cli`].

fn main() -> std::process::ExitCode {
    gateway_user::cli::main()
}
