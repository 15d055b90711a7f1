//! Builds the kernel programs (`gateway-ebpf`) for `bpfel-unknown-none` with
//! aya-build and leaves the object at `$OUT_DIR/gateway-ebpf`, where
//! `kernel::loader` embeds it.
//!
//! The eBPF toolchain (nightly with rust-src, bpf-linker; `cargo xtask setup`
//! installs both) is optional: without it, or with `TURNSTILE_SKIP_EBPF=1`,
//! an empty placeholder object is written, a warning printed, and the gateway
//! runs userspace-only (`--ebpf auto` falls back at start). With the toolchain
//! present, a compile error in the eBPF crate fails the build like any other.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Name of the object in OUT_DIR (aya-build names it after the binary).
const OBJECT: &str = "gateway-ebpf";

fn main() {
    // Precise triggers: the programs, the shared types, this script and the
    // switch. Nothing else in gateway-user reruns the (slow) eBPF build.
    for path in ["build.rs", "../gateway-common/src", "../gateway-common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=TURNSTILE_SKIP_EBPF");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    let object = out_dir.join(OBJECT);

    let outcome = match toolchain_missing() {
        Some(reason) => Err(reason),
        None => build(&object),
    };
    let note = match outcome {
        Ok(()) => "built".to_owned(),
        Err(Failure::Missing(reason)) => {
            println!(
                "cargo:warning=turnstile: kernel assist not built ({reason}); the gateway will run userspace-only. \
                 Run `cargo xtask setup`, then `touch gateway-ebpf/src/main.rs` to build it."
            );
            placeholder(&object);
            format!("not built: {reason}")
        }
        Err(Failure::Build(error)) => {
            // A real compile error in gateway-ebpf: fail like any other crate.
            println!(
                "cargo:warning=turnstile: building the eBPF programs failed; set TURNSTILE_SKIP_EBPF=1 to build userspace-only"
            );
            eprintln!("{error}");
            std::process::exit(1);
        }
    };
    println!("cargo:rustc-env=TURNSTILE_EBPF_BUILD={note}");
    revision();
}

/// `TURNSTILE_GIT_REVISION` for `turnstile --version`: the commit checked
/// out (12 hex digits; uncommitted changes are not told apart), `unknown`
/// outside a git checkout (a source tarball, a Docker context without
/// `.git`). Reruns when HEAD moves or the branch it names does.
fn revision() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let revision = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            // A path that does not exist would rerun this script on every build.
            let watch = |name: &str| {
                if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name])
                    && Path::new(&path).exists()
                {
                    println!("cargo:rerun-if-changed={path}");
                }
            };
            watch("HEAD");
            watch("packed-refs");
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch(&branch);
            }
            commit
        }
        None => "unknown".to_owned(),
    };
    println!("cargo:rustc-env=TURNSTILE_GIT_REVISION={revision}");
}

enum Failure {
    /// The toolchain is absent or skipped on purpose: build userspace-only.
    Missing(String),
    /// The toolchain is there and the build failed.
    Build(String),
}

/// Why the eBPF object cannot be built here, if it cannot.
fn toolchain_missing() -> Option<Failure> {
    if std::env::var("TURNSTILE_SKIP_EBPF").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        return Some(Failure::Missing("TURNSTILE_SKIP_EBPF is set".into()));
    }
    let runs = |program: &str, args: &[&str]| {
        Command::new(program).args(args).output().ok().filter(|out| out.status.success())
    };
    if runs("bpf-linker", &["--version"]).is_none() {
        return Some(Failure::Missing("bpf-linker not found".into()));
    }
    let Some(sysroot) = runs("rustup", &["run", "nightly", "rustc", "--print", "sysroot"]) else {
        return Some(Failure::Missing("no nightly toolchain (rustup run nightly rustc failed)".into()));
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        return Some(Failure::Missing("nightly has no rust-src component".into()));
    }
    None
}

fn build(object: &Path) -> Result<(), Failure> {
    // aya-build relays every stderr line of its inner cargo as a `cargo:warning`; a quiet
    // inner cargo keeps that to real warnings and errors instead of ~40 "Compiling" lines.
    #[allow(unsafe_code)]
    // SAFETY: a build script's main thread, before any other thread exists.
    unsafe {
        std::env::set_var("CARGO_TERM_QUIET", "true");
    }
    let package = aya_build::Package { name: OBJECT, root_dir: "../gateway-ebpf", ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly).map_err(|e| Failure::Build(format!("{e:#}")))?;
    // AYA_BUILD_SKIP makes aya-build return early without an object.
    if !object.exists() {
        return Err(Failure::Missing("AYA_BUILD_SKIP is set".into()));
    }
    Ok(())
}

/// An empty object: `include_bytes!` finds a file, and loading it fails with a
/// clear reason at start.
fn placeholder(object: &Path) {
    if let Err(err) = std::fs::write(object, b"") {
        println!("cargo:warning=writing the placeholder {}: {err}", object.display());
    }
}
