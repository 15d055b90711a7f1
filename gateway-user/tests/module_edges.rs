//! Dependencies between the top-level modules point one way (README,
//! "Architecture"): the proxy calls profiles, limits, routing, kernel and
//! metrics; routing reads the pod store (and the request's profile), which discovery feeds and which
//! asks profiles to parse annotations; the kernel side is called and never
//! calls back; metrics, logfmt (log text, error chains), tokens and plan use no
//! other module, and
//! errors only the limits' refusals (to put them on the wire); only `cli`
//! wires everything, and nothing depends on it.
//!
//! The check reads every `crate::<module>` path in each module's product
//! code (comments and `#[cfg(test)]` items are skipped: a test may reach
//! anywhere) and fails naming the file, line and edge that is not in
//! [`ALLOWED`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module of `gateway-user/src` and the modules it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("admin", &["discovery", "errors", "kernel", "limits", "metrics", "proxy"]),
    (
        "cli",
        &[
            "admin",
            "discovery",
            "engine_metrics",
            "errors",
            "kernel",
            "limits",
            "logfmt",
            "metrics",
            "plan",
            "profiles",
            "proxy",
            "redis_link",
            "routing",
            "tokens",
            "traces",
        ],
    ),
    ("discovery", &["engine_report", "metrics", "profiles"]),
    ("engine_metrics", &["discovery", "engine_report", "metrics", "redis_link"]),
    ("engine_report", &[]),
    ("errors", &["limits"]),
    // Fuzz entry points reach into what they fuzz.
    ("fuzzing", &["discovery", "engine_metrics", "metrics", "profiles", "proxy", "routing", "tokens"]),
    ("kernel", &["logfmt", "metrics", "redis_link"]),
    ("limits", &["metrics", "redis_link"]),
    ("logfmt", &[]),
    ("metrics", &[]),
    ("plan", &[]),
    ("profiles", &[]),
    ("redis_link", &[]),
    (
        "proxy",
        &[
            "discovery",
            "engine_metrics",
            "errors",
            "kernel",
            "limits",
            "logfmt",
            "metrics",
            "profiles",
            "routing",
            "tokens",
            "traces",
        ],
    ),
    ("routing", &["discovery", "engine_metrics", "metrics", "profiles", "redis_link", "tokens"]),
    ("tokens", &[]),
    ("traces", &["metrics"]),
];

/// One use of another module.
#[derive(Debug)]
struct Edge {
    file: PathBuf,
    line: usize,
    to: String,
    text: String,
}

#[test]
fn modules_depend_only_along_the_allowed_edges() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut problems = Vec::new();
    for (module, files) in modules(&src) {
        let Some(may_use) = allowed.get(module.as_str()) else {
            problems.push(format!("module `{module}` is not in ALLOWED: add it with the modules it may use"));
            continue;
        };
        for file in files {
            for edge in edges(&file) {
                if edge.to != module && !may_use.contains(&edge.to.as_str()) {
                    problems.push(format!(
                        "{}:{}: {module} -> {} (`{}`) is not an allowed edge; {module} may use: {}",
                        edge.file.strip_prefix(src.parent().unwrap_or(&src)).unwrap_or(&edge.file).display(),
                        edge.line,
                        edge.to,
                        edge.text,
                        if may_use.is_empty() { "nothing".to_owned() } else { may_use.join(", ") },
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "module dependencies outside the architecture:\n{}", problems.join("\n"));
}

#[test]
fn the_product_never_depends_on_xtask_or_tests() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .expect("gateway-user/Cargo.toml is readable");
    for line in manifest.lines().map(str::trim) {
        for forbidden in ["xtask", "turnstile-tests"] {
            assert!(!line.starts_with(forbidden), "gateway-user/Cargo.toml depends on {forbidden}: {line}");
        }
    }
}

#[test]
fn edges_are_found_in_paths_and_use_groups_but_not_in_comments_or_tests() {
    let dir = std::env::temp_dir().join(format!("module-edges-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("sample.rs");
    let sample = "use crate::{errors::GatewayError, metrics};\n\
                  // crate::proxy in a comment\n\
                  fn f() { crate::routing::lowest(); }\n\
                  #[cfg(test)]\n\
                  fn len() -> usize {\n    crate::kernel::x()\n}\n\
                  fn g() { let _ = crate::limits::FailureMode::Open; }\n\
                  #[cfg(test)]\n\
                  mod tests {\n    use crate::cli;\n}\n";
    std::fs::write(&file, sample).expect("write sample");
    let found: Vec<(usize, String)> = edges(&file).into_iter().map(|e| (e.line, e.to)).collect();
    let _ = std::fs::remove_dir_all(&dir);
    let expected = [(1, "errors"), (1, "metrics"), (3, "routing"), (8, "limits")];
    assert_eq!(found, expected.map(|(line, to)| (line, to.to_owned())));
}

/// Every top-level module of `src` (a `name.rs`, a `name/` folder, or
/// both) with its files; `lib.rs` and `main.rs` are the crate itself.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("gateway-user/src is readable").flatten() {
        let path = entry.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
        if path.is_dir() {
            modules.entry(stem).or_default().extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main" {
            modules.entry(stem).or_default().push(path);
        }
    }
    modules
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("module folder is readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The `crate::<module>` uses in `file`'s product code, in order.
fn edges(file: &Path) -> Vec<Edge> {
    let text = std::fs::read_to_string(file).expect("source file is readable");
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut index = 0;
    while let Some(raw) = lines.get(index) {
        let line = raw.split("//").next().unwrap_or("");
        if line.trim() == "#[cfg(test)]" {
            let item = lines.get(index + 1).map_or("", |l| l.trim());
            if item.starts_with("mod ") || item.starts_with("pub(crate) mod ") || item.starts_with("pub mod ") {
                // Test modules close the file.
                break;
            }
            index = end_of_item(&lines, index + 1) + 1;
            continue;
        }
        for to in crate_paths(line) {
            found.push(Edge { file: file.to_owned(), line: index + 1, to, text: raw.trim().to_owned() });
        }
        index += 1;
    }
    found
}

/// The index of the line where the item starting at `start` closes its braces.
fn end_of_item(lines: &[&str], start: usize) -> usize {
    let mut depth = 0i32;
    let mut opened = false;
    for (index, line) in lines.iter().enumerate().skip(start) {
        for c in line.split("//").next().unwrap_or("").chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth -= 1,
                _ => {}
            }
        }
        if (opened && depth <= 0) || (!opened && line.trim_end().ends_with(';')) {
            return index;
        }
    }
    lines.len()
}

/// The top-level modules named after `crate::` in `line`, including each
/// one of a `crate::{a, b::c}` group.
fn crate_paths(line: &str) -> Vec<String> {
    let mut modules = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            let mut depth = 0;
            let mut item = String::new();
            for c in inner.chars().chain(std::iter::once(',')) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        modules.extend(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
        } else {
            modules.extend(ident(rest));
        }
    }
    modules
}

/// The identifier at the start of `text`, if any.
fn ident(text: &str) -> Option<String> {
    let name: String = text.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && name != "self").then_some(name)
}
